//! The read-only HTTP endpoint: liveness, readiness, container status, blocked attempts and
//! metrics.
//!
//! Deliberately small: HTTP/1.1 served by hyper, GET (and HEAD) only, one request per
//! connection. hyper sets no limits of its own, so they are the agent's: a bounded request head,
//! bounded time to send the request and to take the response, and a cap on concurrent
//! connections that closes the oldest idle one rather than refuse a probe. Handlers copy what they need from the status under a short read lock,
//! so no client can slow the reconcile loop. Nothing from the metadata store is exposed beyond
//! handle, IP, interface, workload and the app/space/org ids (never `log_config`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app_logs::AppLogCounts;
use crate::attribution::{Filter, SharedBlocked};
use crate::config::{EgressRule, Mode};
use crate::metrics::{self, SharedMetrics};
use crate::policy::{Decision, containers_per_rule};
use crate::status::{ReloadReport, SharedStatus, Status};

/// Largest request head accepted (request line + headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head (also the idle timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once. Well inside the descriptor budget (bpm gives the job 1,024 open
/// files; the agent's own sockets and files need a few dozen), and far more than probes and
/// scrapes need. When all are open, a new connection closes the oldest one that is still
/// waiting for its request instead of being refused, so idle or slow clients (any process on
/// the cell can open them) never keep a probe from being answered.
pub const MAX_CONNECTIONS: usize = 256;
/// How often to retry binding when the listen address is unavailable.
pub const BIND_RETRY: Duration = Duration::from_secs(10);

/// Container counts in health bodies.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub restricted: usize,
    pub exempt: usize,
}

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct HealthBody {
    /// "ok"/"unhealthy" (healthz) or "ready"/"not ready" (readyz).
    pub status: String,
    pub enabled: bool,
    /// RFC 3339 time of the last completed pass.
    pub last_reconcile: Option<String>,
    pub last_error: Option<String>,
    pub containers: Counts,
    pub drift_repairs: u64,
    /// Whether the owned table (NFT_TABLE_F_OWNER) guards the rules against other processes;
    /// false on a kernel that refused it, null before the first pass.
    #[serde(default)]
    pub tamper_protection: Option<bool>,
    /// Whether IPv6 is enabled in the cell's network namespace (the IPv6 rules are installed
    /// either way; with IPv6 off there is nothing for them to see).
    #[serde(default)]
    pub ipv6_in_use: bool,
    /// Whether this kernel enforces per-container limits in the kernel (the DNS rate and the
    /// report budgets: a limit per element of a dynamic set, which needs Linux 5.19 or 5.15.148);
    /// false: the DNS guard uses one cell-wide budget instead; null: the probe could not run.
    #[serde(default)]
    pub per_container_limits: Option<bool>,
    /// Why not healthy or not ready; absent when all is well.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// `enforce` or `audit`.
    #[serde(default)]
    pub mode: Mode,
    /// The DNS filter, when `[dns]` is enabled.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dns: Option<crate::dns::DnsHealthBody>,
    /// The app log lines, when `[loggregator]` is enabled: `connected` false means degraded
    /// (lines are not reaching the forwarder agent; enforcement is unaffected).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub app_logs: Option<AppLogsBody>,
}

/// The app log lines' state in `/healthz` and `/readyz` (never a reason to be unready).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AppLogsBody {
    pub connected: bool,
    pub sent: u64,
    pub dropped: u64,
    pub failed: u64,
}

impl AppLogsBody {
    fn of(counts: &AppLogCounts) -> AppLogsBody {
        let [(_, sent), (_, dropped), (_, failed)] = counts.totals();
        AppLogsBody {
            connected: counts.connected.load(Ordering::Relaxed),
            sent,
            dropped,
            failed,
        }
    }
}

/// Body of `/status`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StatusBody {
    pub enabled: bool,
    /// As in [`HealthBody`].
    #[serde(default)]
    pub tamper_protection: Option<bool>,
    /// As in [`HealthBody`].
    #[serde(default)]
    pub ipv6_in_use: bool,
    pub mode: Mode,
    /// As in [`HealthBody`]: the app log lines' state, with `[loggregator]` enabled.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub app_logs: Option<AppLogsBody>,
    /// What every restricted container may reach: `allowed_networks` and the overlay.
    #[serde(default)]
    pub allowed_networks: Vec<IpNet>,
    /// `[[rules]]` in order, each with how many restricted containers it applies to.
    #[serde(default)]
    pub rules: Vec<RuleBody>,
    /// The last configuration reload (SIGHUP), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadReport>,
    pub containers: Vec<Decision>,
}

/// One `[[rules]]` entry in `/status`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct RuleBody {
    pub index: usize,
    #[serde(flatten)]
    pub rule: EgressRule,
    /// The scope in words.
    pub scope: String,
    /// Restricted containers on this cell the rule applies to.
    pub containers: usize,
    /// A hostname rule: addresses its answers allow now (all containers together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_addresses: Option<usize>,
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct Endpoint {
    pub status: SharedStatus,
    pub metrics: SharedMetrics,
    /// When the agent started, for liveness before the first pass.
    pub started: Instant,
    /// Reads the kernel's reject counters when /metrics is scraped (None: never).
    pub counters: Option<CounterReader>,
    /// Blocked-attempt attribution, for `/blocked`.
    pub blocked: SharedBlocked,
    /// The DNS filter's health (None: `[dns]` disabled).
    pub dns: Option<crate::dns::SharedDnsHealth>,
    /// The app log lines' counts, when `[loggregator]` is enabled.
    pub app_logs: Option<Arc<AppLogCounts>>,
}

/// Reads the reject counters for a scrape, at most once per [`COUNTER_REFRESH`]: passes that
/// change nothing do not list the table, so a scrape asks the kernel itself.
#[derive(Clone, Default)]
pub struct CounterReader {
    last: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

/// Minimum time between two counter reads caused by scrapes.
pub const COUNTER_REFRESH: Duration = Duration::from_millis(500);
/// Longest a scrape waits for the kernel's counters.
pub const COUNTER_READ_TIMEOUT: Duration = Duration::from_millis(500);

impl CounterReader {
    pub fn new() -> CounterReader {
        CounterReader::default()
    }

    async fn refresh(&self, metrics: &crate::metrics::Metrics, blocked: &SharedBlocked) {
        // One read at a time; a scrape that finds one under way serves what is known.
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < COUNTER_REFRESH) {
            return;
        }
        *last = Some(Instant::now());
        // A slow kernel must not hold the scrape: serve the last known totals instead.
        let read = crate::dataplane::read_counters();
        match tokio::time::timeout(COUNTER_READ_TIMEOUT, read).await {
            Ok(Ok(tables)) => {
                for (table, (rejected, reported)) in tables {
                    metrics.observe_rejected(table, rejected);
                    let (growth, suppressed) = {
                        let mut blocked = blocked.lock();
                        let growth = blocked.observe_counters(table, reported);
                        (growth, blocked.suppressed)
                    };
                    metrics.record_blocked(growth, suppressed);
                }
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "cannot read reject counters for a scrape")
            }
            Err(_) => tracing::debug!("reading reject counters for a scrape timed out"),
        }
    }
}

/// Binds `addr` (retrying while it is unavailable) and serves until the task is dropped.
pub async fn serve(addr: SocketAddr, endpoint: Endpoint) {
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(err) => {
                tracing::error!(%addr, error = %err, retry_in = ?BIND_RETRY,
                    "cannot bind health endpoint; enforcement continues without it");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    match listener.local_addr() {
        Ok(bound) => tracing::info!(addr = %bound, "health endpoint listening"),
        Err(_) => tracing::info!(%addr, "health endpoint listening"),
    }
    serve_on(listener, endpoint).await;
}

/// Serves on an already bound listener (tests bind 127.0.0.1:0).
pub async fn serve_on(listener: TcpListener, endpoint: Endpoint) {
    serve_with(listener, endpoint, None).await;
}

/// The mutual-TLS listener (`[metrics_tls]`): `/metrics` only, to clients whose certificate
/// the configured CA signed, with the same limits as the plain endpoint (the handshake counts
/// against the time to send the request). Retries binding like [`serve`].
pub async fn serve_metrics_tls(addr: SocketAddr, endpoint: Endpoint, acceptor: TlsAcceptor) {
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(err) => {
                tracing::error!(%addr, error = %err, retry_in = ?BIND_RETRY,
                    "cannot bind the TLS metrics listener; enforcement continues without it");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    tracing::info!(%addr, "TLS metrics listener listening");
    serve_with(listener, endpoint, Some(acceptor)).await;
}

/// The TLS side of `[metrics_tls]`: our certificate, and client certificates required and
/// checked against the CA (rustls with the ring provider).
pub fn tls_acceptor(
    config: &crate::config::MetricsTlsConfig,
) -> Result<TlsAcceptor, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_error = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |err: rustls::pki_types::pem::Error| TlsSetupError::Pem {
            path: path.clone(),
            message: err.to_string(),
        }
    };
    let certs = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
        CertificateDer::pem_file_iter(path)
            .map_err(pem_error(path))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error(path))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&config.ca_cert)? {
        roots.add(ca).map_err(TlsSetupError::Rustls)?;
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(pem_error(&config.key))?;
    let provider = Arc::new(ring_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|err| TlsSetupError::Verifier(err.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&config.cert)?, key)
        .map_err(TlsSetupError::Rustls)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// rustls with the ring provider, as tonic's `tls-ring` uses it: no aws-lc-rs, whose C and
/// cmake build would burden the offline BOSH compile. rustls 0.23.48 deprecated it for lacking
/// post-quantum key exchange, which loopback scraping does not need.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Why the TLS metrics listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read PEM {path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS: {0}")]
    Rustls(rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// Accepts connections, keeping at most [`MAX_CONNECTIONS`] (the oldest idle one closed for a
/// new one), each served by [`handle`]; over TLS with `/metrics` only when `tls` is given.
async fn serve_with(listener: TcpListener, endpoint: Endpoint, tls: Option<TlsAcceptor>) {
    let mut open = Connections::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !open.make_room() {
            tracing::debug!(%peer, "all health connections are being answered; closing");
            continue;
        }
        let waiting = Arc::new(AtomicBool::new(true));
        let endpoint = endpoint.clone();
        let task = match &tls {
            None => tokio::spawn(handle(stream, endpoint, waiting.clone(), Routes::All)),
            Some(acceptor) => {
                let (acceptor, waiting) = (acceptor.clone(), waiting.clone());
                tokio::spawn(async move {
                    // The handshake is part of sending the request, in time and in room.
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(stream)).await
                    {
                        handle(tls, endpoint, waiting, Routes::MetricsOnly).await;
                    }
                })
            }
        };
        open.add(task.abort_handle(), waiting);
    }
}

/// The open connections, oldest first, each with whether it is still waiting for its request.
#[derive(Default)]
struct Connections {
    open: std::collections::VecDeque<(tokio::task::AbortHandle, Arc<AtomicBool>)>,
    /// Connections closed to make room, since start (logged every [`EVICTION_LOG_EVERY`]).
    evicted: u64,
}

/// Log one line per this many connections closed to make room (a flood must not flood the log).
const EVICTION_LOG_EVERY: u64 = 1000;

impl Connections {
    /// Whether a new connection may be served: forgets finished ones and, when
    /// [`MAX_CONNECTIONS`] are open, closes the oldest that is still waiting for its request.
    /// False only when every open connection is being answered (each for at most
    /// [`WRITE_TIMEOUT`]).
    fn make_room(&mut self) -> bool {
        self.open.retain(|(task, _)| !task.is_finished());
        if self.open.len() < MAX_CONNECTIONS {
            return true;
        }
        let Some(oldest_waiting) = self
            .open
            .iter()
            .position(|(_, waiting)| waiting.load(Ordering::Relaxed))
        else {
            return false;
        };
        if let Some((task, _)) = self.open.remove(oldest_waiting) {
            // Dropping the task drops its stream: the client sees the connection close.
            task.abort();
        }
        if self.evicted.is_multiple_of(EVICTION_LOG_EVERY) {
            tracing::info!(
                open = MAX_CONNECTIONS,
                closed_so_far = self.evicted + 1,
                "too many health connections: closing the oldest idle one for each new one"
            );
        }
        self.evicted += 1;
        true
    }

    fn add(&mut self, task: tokio::task::AbortHandle, waiting: Arc<AtomicBool>) {
        self.open.push_back((task, waiting));
    }
}

/// Serves one connection: one request, answered by [`respond`]. The head must arrive within
/// [`REQUEST_TIMEOUT`] (else 408) and fit in [`MAX_REQUEST_BYTES`] (else hyper's 431); the
/// answer must be taken within [`WRITE_TIMEOUT`].
/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routes {
    All,
    /// The TLS listener: `/metrics` and nothing else.
    MetricsOnly,
}

async fn handle<S>(mut stream: S, endpoint: Endpoint, waiting: Arc<AtomicBool>, routes: Routes)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let service = {
        let waiting = waiting.clone();
        service_fn(move |request: Request<Incoming>| {
            // A request head arrived: the connection is no longer the one to close for room.
            waiting.store(false, Ordering::Relaxed);
            let endpoint = endpoint.clone();
            async move {
                let response =
                    if routes == Routes::MetricsOnly && request.uri().path() != "/metrics" {
                        Response::text(404, "not found: this listener serves /metrics only\n")
                            .into_hyper()
                    } else {
                        respond(&request, &endpoint).await
                    };
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let served = {
        let mut builder = http1::Builder::new();
        builder
            .keep_alive(false)
            .max_buf_size(MAX_REQUEST_BYTES)
            .timer(TokioTimer::new())
            .header_read_timeout(REQUEST_TIMEOUT);
        let connection = builder.serve_connection(TokioIo::new(&mut stream), service);
        tokio::time::timeout(REQUEST_TIMEOUT + WRITE_TIMEOUT, connection).await
    };
    let timed_out = match &served {
        Err(_) => true,
        Ok(Err(err)) => err.is_timeout(),
        Ok(Ok(())) => false,
    };
    // No request head in time: hyper closes without a word; say why.
    if timed_out && waiting.load(Ordering::Relaxed) {
        let answer = Response::text(408, "request timeout\n").to_bytes();
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&answer).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// The answer to one request: the kernel's counters first for `/metrics` and `/blocked`.
async fn respond(request: &Request<Incoming>, endpoint: &Endpoint) -> hyper::Response<Full<Bytes>> {
    let path = request.uri().path();
    if let Some(reader) = &endpoint.counters
        && reads_counters(request.method(), path)
    {
        reader.refresh(&endpoint.metrics, &endpoint.blocked).await;
    }
    let query = request.uri().query().unwrap_or("");
    route(request.method(), path, query, endpoint).into_hyper()
}

/// `/metrics` and `/blocked` answer with the kernel's current counters (suppressed packets).
fn reads_counters(method: &Method, path: &str) -> bool {
    matches!(*method, Method::GET | Method::HEAD) && matches!(path, "/metrics" | "/blocked")
}

/// Routes a request to its response. Pure apart from reading the shared status.
pub fn route(method: &Method, path: &str, query: &str, endpoint: &Endpoint) -> Response {
    let head_only = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Response::text(405, "only GET is supported\n")
                .with_header("Allow", "GET, HEAD");
        }
    };
    let response = match path {
        "/healthz" => healthz(endpoint),
        "/readyz" => readyz(endpoint),
        "/status" => status(endpoint),
        "/blocked" => blocked(endpoint, query),
        "/metrics" => Response {
            code: 200,
            content_type: metrics::CONTENT_TYPE,
            body: endpoint.metrics.encode().into_bytes(),
            extra_headers: Vec::new(),
            head_only: false,
        },
        _ => Response::text(
            404,
            "not found: try /healthz, /readyz, /status, /blocked or /metrics\n",
        ),
    };
    if head_only {
        response.without_body()
    } else {
        response
    }
}

fn health_body(
    status: &Status,
    label: &str,
    reason: Option<String>,
    dns: Option<&crate::dns::SharedDnsHealth>,
    app_logs: Option<&AppLogCounts>,
) -> HealthBody {
    HealthBody {
        status: label.to_string(),
        enabled: status.enabled,
        last_reconcile: status.last_pass_wall.map(rfc3339),
        last_error: status.last_error.clone(),
        containers: Counts {
            restricted: status.restricted,
            exempt: status.exempt,
        },
        drift_repairs: status.drift_repairs,
        tamper_protection: status.tamper_protection,
        ipv6_in_use: status.ipv6_in_use,
        per_container_limits: status.per_container_limits,
        reason,
        mode: status.mode,
        dns: dns.map(|d| d.body()),
        app_logs: app_logs.map(AppLogsBody::of),
    }
}

fn healthz(endpoint: &Endpoint) -> Response {
    let status = endpoint.status.read();
    if status.live(Instant::now(), endpoint.started) {
        Response::json(
            200,
            &health_body(
                &status,
                "ok",
                None,
                endpoint.dns.as_ref(),
                endpoint.app_logs.as_deref(),
            ),
        )
    } else {
        let reason = format!(
            "no reconcile pass completed within {}",
            humantime::format_duration(status.reconcile_interval * 3)
        );
        Response::json(
            503,
            &health_body(
                &status,
                "unhealthy",
                Some(reason),
                endpoint.dns.as_ref(),
                endpoint.app_logs.as_deref(),
            ),
        )
    }
}

fn readyz(endpoint: &Endpoint) -> Response {
    let status = endpoint.status.read();
    // A stalled loop is not ready either: its last verdict on the kernel may be stale.
    let stalled = (!status.live(Instant::now(), endpoint.started) && status.last_pass.is_some())
        .then(|| "reconcile loop has stalled".to_string());
    // The DNS filter not listening, or its upstream not answering, is not ready either:
    // restricted containers' DNS fails while it lasts.
    let dns = endpoint.dns.as_ref();
    let app_logs = endpoint.app_logs.as_deref();
    let reason = stalled
        .or_else(|| status.not_ready_reason())
        .or_else(|| dns.and_then(|d| d.problem()));
    match reason {
        None => Response::json(200, &health_body(&status, "ready", None, dns, app_logs)),
        Some(reason) => Response::json(
            503,
            &health_body(&status, "not ready", Some(reason), dns, app_logs),
        ),
    }
}

fn status(endpoint: &Endpoint) -> Response {
    // Pointers are copied under the lock, the decisions themselves after it is released.
    let (mut body, decisions, rule_set, learned) = {
        let status = endpoint.status.read();
        let body = StatusBody {
            enabled: status.enabled,
            tamper_protection: status.tamper_protection,
            ipv6_in_use: status.ipv6_in_use,
            mode: status.mode,
            app_logs: endpoint.app_logs.as_deref().map(AppLogsBody::of),
            allowed_networks: status.allowed.clone(),
            rules: Vec::new(),
            last_reload: status.last_reload.clone(),
            containers: Vec::new(),
        };
        (
            body,
            status.decisions.values().cloned().collect::<Vec<_>>(),
            status.rule_set.clone(),
            status.learned_per_mark.clone(),
        )
    };
    let counts = containers_per_rule(&rule_set, decisions.iter().map(|d| &**d));
    body.rules = rule_set
        .rules
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(index, (rule, containers))| RuleBody {
            index,
            rule: rule.clone(),
            scope: rule.scope_text(),
            containers,
            learned_addresses: rule_set
                .host_marks()
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, mark)| learned.get(mark).copied().unwrap_or(0)),
        })
        .collect();
    body.containers = decisions.iter().map(|d| (**d).clone()).collect();
    Response::json(200, &body)
}

/// Largest value of a `/blocked` query parameter (a GUID is 36 bytes).
const MAX_QUERY_VALUE: usize = 256;

/// `GET /blocked?app_id=&space_id=&org_id=`: the summary of blocked attempts, most recent
/// first; an unknown parameter is a 400 that names it.
fn blocked(endpoint: &Endpoint, query: &str) -> Response {
    let filter = match parse_filter(query) {
        Ok(filter) => filter,
        Err(message) => return Response::text(400, &format!("{message}\n")),
    };
    let body = endpoint.blocked.lock().report(&filter);
    Response::json(200, &body)
}

/// The filter in a query string: `app_id`, `space_id`, `org_id`, percent-decoded.
pub fn parse_filter(query: &str) -> Result<Filter, String> {
    let mut filter = Filter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(raw)
            .filter(|v| v.len() <= MAX_QUERY_VALUE)
            .ok_or_else(|| format!("query parameter {name:?} has an invalid value"))?;
        let slot = match name {
            "app_id" => &mut filter.app_id,
            "space_id" => &mut filter.space_id,
            "org_id" => &mut filter.org_id,
            other => {
                return Err(format!(
                    "unknown query parameter {other:?}: use app_id, space_id or org_id"
                ));
            }
        };
        // An empty value (`?app_id=`) filters nothing.
        *slot = (!value.is_empty()).then_some(value);
    }
    Ok(filter)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// An HTTP response about to be written.
#[derive(Debug)]
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    extra_headers: Vec<(&'static str, &'static str)>,
    /// Answer to HEAD: headers (with the GET Content-Length) but no body.
    head_only: bool,
}

impl Response {
    fn text(code: u16, body: &str) -> Response {
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            extra_headers: Vec::new(),
            head_only: false,
        }
    }

    fn json(code: u16, body: &impl Serialize) -> Response {
        let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
        bytes.push(b'\n');
        Response {
            code,
            content_type: "application/json",
            body: bytes,
            extra_headers: Vec::new(),
            head_only: false,
        }
    }

    fn with_header(mut self, name: &'static str, value: &'static str) -> Response {
        self.extra_headers.push((name, value));
        self
    }

    fn without_body(mut self) -> Response {
        self.head_only = true;
        self
    }

    /// The response as hyper sends it: the same status, headers and body as [`Self::to_bytes`]
    /// (a HEAD answer keeps the GET's Content-Length and has no body).
    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let length = self.body.len();
        let body = if self.head_only {
            Bytes::new()
        } else {
            Bytes::from(self.body)
        };
        let mut response = hyper::Response::new(Full::new(body));
        *response.status_mut() = hyper::StatusCode::from_u16(self.code)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.extra_headers {
            headers.insert(name, HeaderValue::from_static(value));
        }
        response
    }

    /// The response as raw HTTP/1.1 (the 408 written after hyper gave up on a silent client).
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            self.code,
            reason_phrase(self.code),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.extra_headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests;
