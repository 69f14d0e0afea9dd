//! The filter's UDP and TCP listeners and its upstream exchanges.
//!
//! Everything is bounded: a query's size ([`MAX_QUERY_BYTES`]); the upstream queries in flight
//! (`dns.max_inflight`, and a share of it per container, see [`INFLIGHT_SHARE_DIVISOR`]; an
//! allowed query beyond either gets SERVFAIL at once); each upstream exchange
//! (`dns.upstream_timeout`, then SERVFAIL); the TCP connections at once
//! ([`MAX_TCP_CONNECTIONS`], and `dns.per_container_tcp_connections` of any one container); the
//! time a TCP client has to send its next query ([`TCP_IDLE_TIMEOUT`]) and the queries one
//! connection may ask ([`MAX_QUERIES_PER_CONNECTION`]).
//! Refused names are answered inline and never wait for anything.
//!
//! Each upstream query uses a fresh socket (a new ephemeral port) and keeps the client's id:
//! the answer is taken only from the upstream's address, with that id and that question, and
//! relayed byte for byte. The id mapping is the identity, so it cannot be confused.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::answer;
use super::filter::{self, Decision, Filter, HostRule, MAX_QUERY_BYTES, Query};
use super::{
    Askers, DnsRefusal, LearnBound, LearnReply, LearnRequest, QueryResult, RefusalSink,
    SharedDnsHealth,
};
use crate::config::Config;

/// TCP connections served at once; more are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Time a TCP client has to send (each part of) its next query.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries one TCP connection may ask before it is closed.
pub const MAX_QUERIES_PER_CONNECTION: usize = 32;
/// Time a client has to take an answer (TCP), or the socket to accept one (UDP).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often binding is retried while the listen address is unavailable.
pub const BIND_RETRY: Duration = Duration::from_secs(2);
/// Each container's share of `dns.max_inflight`: a 32nd of it, and at least
/// [`MIN_INFLIGHT_PER_CONTAINER`]. One container (or several instances of one app) flooding
/// allowed names then holds a bounded part of the upstream queries, and the rest stay free for
/// the others; at the defaults a container may have 8 queries in flight, thousands a second
/// with an upstream that answers in a millisecond.
pub const INFLIGHT_SHARE_DIVISOR: usize = 32;
/// The least share of a container, whatever `dns.max_inflight` is.
pub const MIN_INFLIGHT_PER_CONTAINER: usize = 4;
/// The largest DNS message (an answer over TCP, or over UDP with EDNS).
const MAX_MESSAGE_BYTES: usize = 65_535;

/// The filter, its upstream and its bounds.
pub struct Server {
    /// Which names are forwarded and how others are refused: replaced whole by a reload.
    filter: std::sync::RwLock<Arc<Filter>>,
    upstream: SocketAddr,
    timeout: Duration,
    /// Only containers are served: redirected queries keep their overlay source.
    overlay: Ipv4Net,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    /// TCP connections one container may hold at once (`dns.per_container_tcp_connections`).
    tcp_per_container: usize,
    /// Open TCP connections by container.
    tcp_open: Arc<Mutex<HashMap<Ipv4Addr, usize>>>,
    /// Upstream queries one container may have in flight (its share of `max_inflight`).
    inflight_per_container: usize,
    /// Upstream queries in flight by container.
    inflight_by_container: Arc<Mutex<HashMap<Ipv4Addr, usize>>>,
    health: SharedDnsHealth,
    sink: Arc<dyn RefusalSink>,
    /// Who is behind a source address (for hostname rules).
    askers: Arc<dyn Askers>,
    /// Where learn requests go (the reconcile loop); None: hostname answers get SERVFAIL.
    learner: Option<tokio::sync::mpsc::Sender<LearnRequest>>,
    /// Takes how long each learned answer waited for the kernel.
    learn_waited: Option<super::LearnTimer>,
    /// `dns.answer_ttl_min` and `dns.answer_ttl_max` (a reload changes them).
    answer_ttl: std::sync::RwLock<(Duration, Duration)>,
}

/// Extra time a learned element stays beyond the TTL the container is given, so that an
/// answer cached for its full TTL never outlives the address.
pub const LEARN_GRACE: Duration = Duration::from_secs(1);
/// How long an answer waits for the kernel to allow its addresses before SERVFAIL.
pub const LEARN_WAIT: Duration = Duration::from_secs(2);

/// An admitted upstream query: one of `max_inflight`, and one of its container's share.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _share: ContainerHold,
}

/// One container's hold on one of a bounded resource (a TCP connection, an upstream query in
/// flight): released when dropped.
struct ContainerHold {
    open: Arc<Mutex<HashMap<Ipv4Addr, usize>>>,
    src: Ipv4Addr,
}

impl ContainerHold {
    /// Takes one for `src`, or None when it holds `limit` already.
    fn take(
        open: &Arc<Mutex<HashMap<Ipv4Addr, usize>>>,
        src: Ipv4Addr,
        limit: usize,
    ) -> Option<Self> {
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(src).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ContainerHold {
            open: open.clone(),
            src,
        })
    }
}

impl Drop for ContainerHold {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.src) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.src);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

impl Server {
    pub fn new(config: &Config, health: SharedDnsHealth, sink: Arc<dyn RefusalSink>) -> Server {
        Server {
            filter: std::sync::RwLock::new(Arc::new(Filter::with_rules(
                &config.dns,
                Arc::new(crate::policy::RuleSet::new(config.rules.clone())),
            ))),
            upstream: config.dns.upstream,
            timeout: config.dns.upstream_timeout,
            overlay: config.overlay_network,
            inflight: Arc::new(Semaphore::new(config.dns.max_inflight)),
            max_inflight: config.dns.max_inflight,
            tcp_per_container: config.dns.per_container_tcp_connections,
            tcp_open: Arc::default(),
            inflight_per_container: (config.dns.max_inflight / INFLIGHT_SHARE_DIVISOR)
                .max(MIN_INFLIGHT_PER_CONTAINER),
            inflight_by_container: Arc::default(),
            health,
            sink,
            askers: Arc::new(super::NoAskers),
            learner: None,
            learn_waited: None,
            answer_ttl: std::sync::RwLock::new((
                config.dns.answer_ttl_min,
                config.dns.answer_ttl_max,
            )),
        }
    }

    /// Learns hostname rules' answers: `askers` says who asks, `learner` takes the requests,
    /// `waited` how long each answer waited for the kernel.
    pub fn with_learning(mut self, learning: super::Learning) -> Server {
        self.askers = learning.askers;
        self.learner = Some(learning.learner);
        self.learn_waited = Some(learning.waited);
        self
    }

    /// Takes the names a reload changed (`dns.allowed_suffixes`, `dns.refuse_with`): queries
    /// decided from now on use them; those in flight finish with the filter they started with.
    pub fn set_names(&self, config: &Config) {
        let rules = Arc::new(crate::policy::RuleSet::new(config.rules.clone()));
        let filter = Arc::new(Filter::with_rules(&config.dns, rules));
        *self.filter.write().unwrap_or_else(|p| p.into_inner()) = filter;
        *self.answer_ttl.write().unwrap_or_else(|p| p.into_inner()) =
            (config.dns.answer_ttl_min, config.dns.answer_ttl_max);
    }

    /// Binds `listen` for UDP and TCP (retrying every [`BIND_RETRY`] while it cannot; health
    /// says why) and serves forever.
    pub async fn run(self: Arc<Self>, listen: SocketAddr) {
        let (udp, tcp) = loop {
            match bind(listen).await {
                Ok(sockets) => break sockets,
                Err(err) => {
                    tracing::error!(%listen, error = %err, retry_in = ?BIND_RETRY,
                        "DNS filter cannot listen; restricted containers get no DNS answers");
                    self.health.listening(Err(format!("{listen}: {err}")));
                    tokio::time::sleep(BIND_RETRY).await;
                }
            }
        };
        let bound = udp.local_addr().unwrap_or(listen);
        tracing::info!(addr = %bound, upstream = %self.upstream, "DNS filter listening");
        self.health.listening(Ok(bound));
        self.serve_on(udp, tcp).await;
    }

    /// Serves on sockets already bound (tests bind 127.0.0.1:0).
    pub async fn serve_on(self: Arc<Self>, udp: UdpSocket, tcp: TcpListener) {
        let udp_loop = tokio::spawn(self.clone().serve_udp(Arc::new(udp)));
        let tcp_loop = tokio::spawn(self.serve_tcp(tcp));
        // Neither loop ends; should one panic, the other goes on.
        let _ = tokio::join!(udp_loop, tcp_loop);
    }

    /// The source address when it is a container's (the overlay); None for anyone else.
    fn container(&self, peer: SocketAddr) -> Option<Ipv4Addr> {
        match peer {
            SocketAddr::V4(v4) if self.overlay.contains(v4.ip()) => Some(*v4.ip()),
            _ => None,
        }
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        // One byte more than a query may have: a longer datagram fills it and is oversized.
        let mut buf = vec![0u8; MAX_QUERY_BYTES + 1];
        loop {
            let (len, peer) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(err) => {
                    // ICMP errors for earlier answers surface here; nothing to do but go on.
                    tracing::debug!(error = %err, "DNS filter: UDP receive error");
                    continue;
                }
            };
            let Some(src) = self.container(peer) else {
                self.health.count(QueryResult::Ignored);
                continue;
            };
            let query = match self.decide(&buf[..len], src, Transport::Udp) {
                Handled::Answer(answer) => {
                    // Never wait for a full socket buffer here: drop the answer instead.
                    let _ = socket.try_send_to(&answer, peer);
                    continue;
                }
                Handled::Dropped => continue,
                Handled::Forward(query) => query,
            };
            let Some(permit) = self.admit(src) else {
                if let Some(answer) = filter::servfail(&query) {
                    let _ = socket.try_send_to(&answer, peer);
                }
                continue;
            };
            let (server, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                let answer = server.forward(&query, Transport::Udp).await;
                drop(permit);
                server.health.set_inflight(server.inflight_now());
                if let Some(answer) = answer {
                    let _ =
                        tokio::time::timeout(WRITE_TIMEOUT, socket.send_to(&answer, peer)).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "DNS filter: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Some(src) = self.container(peer) else {
                self.health.count(QueryResult::Ignored);
                continue;
            };
            // The container's own share first: one container holding its limit must not also
            // use up the connections everyone shares.
            let Some(held) = ContainerHold::take(&self.tcp_open, src, self.tcp_per_container)
            else {
                self.health.tcp_connection_refused();
                tracing::debug!(%peer, "DNS filter: container at its TCP connection limit; closing");
                continue;
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "DNS filter: too many TCP connections; closing");
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                server.serve_connection(stream, src).await;
                drop(permit);
                drop(held);
            });
        }
    }

    /// Queries on one TCP connection, one after the other, each framed by its length.
    async fn serve_connection(&self, mut stream: TcpStream, src: Ipv4Addr) {
        for _ in 0..MAX_QUERIES_PER_CONNECTION {
            let mut length = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut length)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let length = usize::from(u16::from_be_bytes(length));
            if length > MAX_QUERY_BYTES {
                self.health.count(QueryResult::Malformed);
                return;
            }
            let mut query = vec![0u8; length];
            match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                _ => {
                    self.health.count(QueryResult::Malformed);
                    return;
                }
            }
            let answer = match self.decide(&query, src, Transport::Tcp) {
                Handled::Answer(answer) => Some(answer),
                Handled::Dropped => return,
                Handled::Forward(query) => match self.admit(src) {
                    Some(permit) => {
                        let answer = self.forward(&query, Transport::Tcp).await;
                        drop(permit);
                        self.health.set_inflight(self.inflight_now());
                        answer
                    }
                    None => filter::servfail(&query),
                },
            };
            let Some(answer) = answer else { return };
            let Ok(length) = u16::try_from(answer.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&length.to_be_bytes());
            framed.extend_from_slice(&answer);
            match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    /// The filter's decision, counted, with refusals reported.
    fn decide(&self, bytes: &[u8], src: Ipv4Addr, transport: Transport) -> Handled {
        let current = self
            .filter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let asker = if current.has_hostname_rules() {
            self.askers.asker(src)
        } else {
            None
        };
        match current.decide_for(bytes, asker.as_ref()) {
            Decision::Drop(why) => {
                tracing::trace!(%src, why = why.as_str(), "DNS filter: dropped a malformed query");
                self.health.count(QueryResult::Malformed);
                Handled::Dropped
            }
            Decision::Refuse {
                answer,
                name,
                qtype,
            } => {
                self.health.count(QueryResult::Refused);
                self.sink.refused(&DnsRefusal {
                    src,
                    name,
                    qtype,
                    transport: transport.as_str(),
                    at: SystemTime::now(),
                });
                Handled::Answer(answer)
            }
            Decision::Forward { query } => Handled::Forward(query),
        }
    }

    /// A slot for one upstream query of `src`, or None (counted: the client gets SERVFAIL)
    /// when `src` has its share in flight already, or `max_inflight` are in flight.
    fn admit(&self, src: Ipv4Addr) -> Option<Admitted> {
        let share = ContainerHold::take(
            &self.inflight_by_container,
            src,
            self.inflight_per_container,
        );
        let slot = share.and_then(|share| {
            let permit = self.inflight.clone().try_acquire_owned().ok()?;
            Some(Admitted {
                _permit: permit,
                _share: share,
            })
        });
        match slot {
            Some(slot) => {
                self.health.set_inflight(self.inflight_now());
                Some(slot)
            }
            None => {
                self.health.overloaded();
                self.health.count(QueryResult::Error);
                None
            }
        }
    }

    fn inflight_now(&self) -> usize {
        self.max_inflight
            .saturating_sub(self.inflight.available_permits())
    }

    /// Asks the upstream (bounded by `dns.upstream_timeout`): its answer, unchanged, or
    /// SERVFAIL when it did not answer.
    async fn forward(&self, query: &Query, transport: Transport) -> Option<Vec<u8>> {
        let exchange = async {
            match transport {
                Transport::Udp => exchange_udp(self.upstream, query).await,
                Transport::Tcp => exchange_tcp(self.upstream, query).await,
            }
        };
        let error = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => {
                self.health.upstream_answered();
                self.health.count(QueryResult::Forwarded);
                return match query.learn {
                    Some(rule) => self.learn(query, rule, answer).await,
                    None => Some(answer),
                };
            }
            Ok(Err(err)) => err,
            Err(_) => format!(
                "no answer over {} within {}",
                transport.as_str(),
                humantime::format_duration(self.timeout)
            ),
        };
        tracing::debug!(upstream = %self.upstream, name = %query.name, %error,
            "DNS filter: upstream query failed; answering SERVFAIL");
        self.health.upstream_failed(error);
        self.health.count(QueryResult::Error);
        filter::servfail(query)
    }
}

impl Server {
    /// Has the kernel allow what a hostname rule's answer gives, then hands out the answer
    /// with what is allowed (and TTLs no longer than it stays so); SERVFAIL when it cannot.
    async fn learn(&self, query: &Query, rule: HostRule, answer: Vec<u8>) -> Option<Vec<u8>> {
        let received = std::time::Instant::now();
        let (min, max) = *self.answer_ttl.read().unwrap_or_else(|p| p.into_inner());
        let Some(learnable) = answer::learnable(&answer, &query.name, min, max) else {
            self.health.learn_failed();
            return filter::servfail(query);
        };
        if learnable.over_bound > 0 {
            self.health
                .learn_bound(LearnBound::Answer, learnable.over_bound);
        }
        if learnable.addresses.is_empty() {
            // NXDOMAIN or no address of that type: nothing to allow, relayed as it is.
            return Some(answer);
        }
        let reply = self.request_learning(rule, &learnable).await;
        let reply = match reply {
            Ok(reply) if !reply.allowed.is_empty() => reply,
            Ok(reply) => {
                self.count_bounds(&reply);
                self.health.learn_failed();
                return filter::servfail(query);
            }
            Err(error) => {
                tracing::warn!(name = %query.name, %error,
                    "could not allow a hostname rule's addresses; answering SERVFAIL");
                self.health.learn_failed();
                return filter::servfail(query);
            }
        };
        if let Some(waited) = &self.learn_waited {
            waited(received.elapsed());
        }
        self.count_bounds(&reply);
        self.health.learned(reply.allowed.len());
        answer::rewrite(&answer, &query.name, &reply.allowed, learnable.allowed_for)
            .or_else(|| filter::servfail(query))
    }

    fn count_bounds(&self, reply: &LearnReply) {
        if reply.refused_container > 0 {
            self.health
                .learn_bound(LearnBound::Container, reply.refused_container);
        }
        if reply.refused_total > 0 {
            self.health
                .learn_bound(LearnBound::Total, reply.refused_total);
        }
    }

    /// Sends the request to the reconcile loop and waits (bounded) for the kernel's answer.
    async fn request_learning(
        &self,
        rule: HostRule,
        learnable: &answer::Learnable,
    ) -> Result<LearnReply, String> {
        let learner = self
            .learner
            .as_ref()
            .ok_or("no reconcile loop takes learn requests")?;
        let (reply, answered) = tokio::sync::oneshot::channel();
        let request = LearnRequest {
            ifindex: rule.ifindex,
            mark: rule.mark,
            addresses: learnable.addresses.clone(),
            timeout: learnable.allowed_for + LEARN_GRACE,
            reply,
        };
        learner
            .try_send(request)
            .map_err(|e| format!("learn queue: {e}"))?;
        match tokio::time::timeout(LEARN_WAIT, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the reconcile loop dropped the request".into()),
            Err(_) => Err(format!(
                "no answer from the reconcile loop within {}",
                humantime::format_duration(LEARN_WAIT)
            )),
        }
    }
}

/// What [`Server::decide`] left to do.
enum Handled {
    Answer(Vec<u8>),
    Dropped,
    Forward(Query),
}

async fn bind(listen: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    // Port 0 (tests): the TCP listener takes the port UDP got, which another process may
    // already hold for TCP; a few fresh ports are tried before giving up.
    let attempts = if listen.port() == 0 { 8 } else { 1 };
    let mut result = Err(std::io::Error::other("no attempt"));
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen).await?;
        result = match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(err) => Err(err),
        };
    }
    result
}

fn unspecified_for(upstream: SocketAddr) -> SocketAddr {
    match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// One query over UDP from a fresh port; datagrams that are not its answer are ignored (the
/// caller's timeout bounds the wait).
async fn exchange_udp(upstream: SocketAddr, query: &Query) -> Result<Vec<u8>, String> {
    let socket = UdpSocket::bind(unspecified_for(upstream))
        .await
        .map_err(|e| format!("bind: {e}"))?;
    socket
        .connect(upstream)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    socket
        .send(&query.bytes)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    loop {
        let len = socket
            .recv(&mut buf)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if filter::answers(query, &buf[..len]) {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

/// One query over a new TCP connection.
async fn exchange_tcp(upstream: SocketAddr, query: &Query) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let length = u16::try_from(query.bytes.len()).map_err(|_| "query too long".to_string())?;
    let mut framed = Vec::with_capacity(query.bytes.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&query.bytes);
    stream
        .write_all(&framed)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut length = [0u8; 2];
    stream
        .read_exact(&mut length)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    if filter::answers(query, &answer) {
        Ok(answer)
    } else {
        Err("the answer does not match the query".into())
    }
}

#[cfg(test)]
mod tests;
