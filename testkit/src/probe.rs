//! Real traffic between namespaces: echo servers and TCP / UDP / ICMP probes.
//!
//! A network namespace is entered per thread (`setns(CLONE_NEWNET)`), so servers and clients
//! run in short-lived threads that first move into `/run/netns/<name>`; a socket stays in the
//! namespace it was created in. Every probe is bounded by short timeouts.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use super::cmd;

/// TCP port every echo server listens on.
pub const TCP_PORT: u16 = 8080;
/// UDP port every echo server listens on.
pub const UDP_PORT: u16 = 5353;

const TCP_CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
const TCP_READ_TIMEOUT: Duration = Duration::from_millis(1000);
const UDP_REPLY_TIMEOUT: Duration = Duration::from_millis(800);
/// A restricted TCP connect must fail by RST faster than this.
pub const FAST_REJECT: Duration = Duration::from_millis(1000);

/// Moves the calling thread into network namespace `ns` for good: sockets it creates, and
/// processes it spawns, live there.
pub fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file =
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e} (namespace gone?)"));
    setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// Runs `f` in a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("thread inside netns {ns} panicked"))
    })
}

/// Spawns a thread that enters network namespace `ns` and runs `f`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e} (namespace gone?)"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
}

/// Sends a UDP datagram from namespace `ns` to `dst` every millisecond until `stop` is set;
/// the thread returns how many it sent.
pub fn udp_stream(ns: &str, dst: impl Into<SocketAddr>, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    udp_stream_every(ns, dst, Duration::from_millis(1), stop)
}

/// Like [`udp_stream`], one datagram every `every` (plus the sleep's own overshoot).
pub fn udp_stream_every(
    ns: &str,
    dst: impl Into<SocketAddr>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    let dst = dst.into();
    spawn_in_netns(ns, move || {
        let socket = UdpSocket::bind(unspecified_like(dst)).expect("bind udp stream");
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            // Errors (ICMP admin-prohibited reported on the socket) are expected here.
            if socket.send_to(b"egt-stream", dst).is_ok() {
                sent += 1;
            }
            std::thread::sleep(every);
        }
        sent
    })
}

/// How the connection attempts of a [`tcp_stream`] ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTally {
    /// Connection attempts made (one SYN each, unless the kernel refused to send it).
    pub attempts: u64,
    /// Refused by a reset: from the cell's reject, or from the destination when nothing listens.
    pub refused: u64,
    /// Connected: the destination answered the SYN with a SYN-ACK.
    pub connected: u64,
    /// Timed out, or failed with another error (e.g. an ICMP error).
    pub other: u64,
}

/// Attempts a TCP connection from namespace `ns` to `dst` every `every` (plus the attempt's
/// own time; each bounded by 100 ms, closed at once if it connects) until `stop` is set; the
/// thread returns the tally.
pub fn tcp_stream(
    ns: &str,
    dst: impl Into<SocketAddr>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<TcpTally> {
    let dst = dst.into();
    spawn_in_netns(ns, move || {
        let mut tally = TcpTally::default();
        while !stop.load(Ordering::Relaxed) {
            tally.attempts += 1;
            match TcpStream::connect_timeout(&dst, Duration::from_millis(100)) {
                Ok(_) => tally.connected += 1,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => tally.refused += 1,
                Err(_) => tally.other += 1,
            }
            std::thread::sleep(every);
        }
        tally
    })
}

static NONCE: AtomicU64 = AtomicU64::new(1);

fn nonce() -> String {
    format!(
        "egt-{}-{}",
        std::process::id(),
        NONCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Port 0 on the unspecified address of `dst`'s family (for a client socket's bind).
fn unspecified_like(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One request an echo server received.
#[derive(Clone, Debug)]
pub struct Hit {
    pub proto: Proto,
    /// Namespace of the server.
    pub ns: String,
    pub from: SocketAddr,
    pub payload: String,
}

/// Everything the cell's echo servers received, in order.
pub type HitLog = Arc<Mutex<Vec<Hit>>>;

/// TCP and UDP echo servers running in one namespace until dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts a TCP echo server on each of `tcp_ports` and a UDP echo server on each of
    /// `udp_ports`, all on 0.0.0.0 in namespace `ns`, recording what they receive in `log`.
    pub fn start(ns: &str, tcp_ports: &[u16], udp_ports: &[u16], log: &HitLog) -> Servers {
        Servers::start_on(ns, Ipv4Addr::UNSPECIFIED, tcp_ports, udp_ports, log)
    }

    /// Like [`start`](Self::start), bound to address `ip` (a UDP server on a secondary
    /// address must bind it, or its replies leave from the primary address). IPv6 servers
    /// bind the host's IPv6 address this way, beside the IPv4 servers of
    /// [`start`](Self::start) on 0.0.0.0 and the same ports (`::` would take those).
    pub fn start_on(
        ns: &str,
        ip: impl Into<IpAddr>,
        tcp_ports: &[u16],
        udp_ports: &[u16],
        log: &HitLog,
    ) -> Servers {
        let ip: IpAddr = ip.into();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (listeners, sockets) = in_netns(ns, || {
            let l: Vec<TcpListener> = tcp_ports
                .iter()
                .map(|p| {
                    TcpListener::bind((ip, *p))
                        .unwrap_or_else(|e| panic!("bind tcp {ip} {p} in {ns}: {e}"))
                })
                .collect();
            let u: Vec<UdpSocket> = udp_ports
                .iter()
                .map(|p| {
                    UdpSocket::bind((ip, *p))
                        .unwrap_or_else(|e| panic!("bind udp {ip} {p} in {ns}: {e}"))
                })
                .collect();
            (l, u)
        });
        for listener in listeners {
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let (stop, log, ns) = (stop.clone(), log.clone(), ns.to_string());
            threads.push(std::thread::spawn(move || {
                tcp_server(listener, &stop, &log, &ns)
            }));
        }
        for socket in sockets {
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("udp timeout");
            let (stop, log, ns) = (stop.clone(), log.clone(), ns.to_string());
            threads.push(std::thread::spawn(move || {
                udp_server(socket, &stop, &log, &ns)
            }));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn record(log: &HitLog, hit: Hit) {
    log.lock().unwrap_or_else(|p| p.into_inner()).push(hit);
}

fn tcp_server(listener: TcpListener, stop: &AtomicBool, log: &HitLog, ns: &str) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 128];
                let n = stream.read(&mut buf).unwrap_or(0);
                let payload = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                let _ = stream.write_all(format!("ok {payload}\n").as_bytes());
                record(
                    log,
                    Hit {
                        proto: Proto::Tcp,
                        ns: ns.to_string(),
                        from,
                        payload,
                    },
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn udp_server(socket: UdpSocket, stop: &AtomicBool, log: &HitLog, ns: &str) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let payload = String::from_utf8_lossy(&buf[..n]).to_string();
            let _ = socket.send_to(&buf[..n], from);
            record(
                log,
                Hit {
                    proto: Proto::Udp,
                    ns: ns.to_string(),
                    from,
                    payload,
                },
            );
        }
    }
}

/// How a TCP connection attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpOutcome {
    /// Connected and the echo came back.
    Echoed,
    /// Connected, but the echo did not come back.
    ConnectedNoEcho(String),
    /// Connection refused (RST), after this long.
    Refused(Duration),
    /// Connect timed out (nothing came back).
    TimedOut,
    /// Any other error (e.g. host unreachable from an ICMP error).
    Error(String),
}

/// How a UDP exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpOutcome {
    /// The echo came back.
    Echoed,
    /// An ICMP error was reported on the connected socket.
    Error(String),
    /// Nothing came back within the timeout.
    NoReply,
}

/// TCP connect from namespace `ns` to `dst`, send a nonce, expect it echoed.
/// Returns the outcome and the nonce sent (if connected).
pub fn tcp(ns: &str, dst: impl Into<SocketAddr>) -> (TcpOutcome, String) {
    let dst: SocketAddr = dst.into();
    let n = nonce();
    let outcome = in_netns(ns, || {
        let start = Instant::now();
        let mut stream = match TcpStream::connect_timeout(&dst, TCP_CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return TcpOutcome::Refused(start.elapsed());
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => return TcpOutcome::TimedOut,
            Err(e) => return TcpOutcome::Error(e.to_string()),
        };
        let _ = stream.set_read_timeout(Some(TCP_READ_TIMEOUT));
        if let Err(e) = stream.write_all(format!("{n}\n").as_bytes()) {
            return TcpOutcome::ConnectedNoEcho(format!("write: {e}"));
        }
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        if reply.trim() == format!("ok {n}") {
            TcpOutcome::Echoed
        } else {
            TcpOutcome::ConnectedNoEcho(format!("reply {reply:?}"))
        }
    });
    (outcome, n)
}

/// UDP datagram from namespace `ns` (source address chosen by the kernel) to `dst`.
/// Returns the outcome and the nonce sent.
pub fn udp(ns: &str, dst: impl Into<SocketAddr>) -> (UdpOutcome, String) {
    let dst: SocketAddr = dst.into();
    let n = nonce();
    let outcome = in_netns(ns, || {
        let socket = UdpSocket::bind(unspecified_like(dst)).expect("bind udp client");
        socket.connect(dst).expect("connect udp client");
        socket
            .set_read_timeout(Some(UDP_REPLY_TIMEOUT))
            .expect("udp read timeout");
        if let Err(e) = socket.send(n.as_bytes()) {
            return UdpOutcome::Error(format!("send: {e}"));
        }
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + UDP_REPLY_TIMEOUT;
        while Instant::now() < deadline {
            match socket.recv(&mut buf) {
                Ok(len) if buf[..len] == *n.as_bytes() => return UdpOutcome::Echoed,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return UdpOutcome::NoReply;
                }
                Err(e) => return UdpOutcome::Error(e.to_string()),
            }
        }
        UdpOutcome::NoReply
    });
    (outcome, n)
}

/// One ICMP (or ICMPv6) echo from namespace `ns` to `dst` (`ping -c1 -W1`). True if answered.
pub fn ping(ns: &str, dst: impl Into<IpAddr>) -> (bool, String) {
    let dst: IpAddr = dst.into();
    let out = cmd::ns_try_run(ns, "ping", &["-n", "-c1", "-W1", &dst.to_string()], None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text
        .lines()
        .find(|l| l.contains("icmp_seq") || l.contains("packets transmitted"))
        .unwrap_or("")
        .trim()
        .to_string();
    (out.status.success(), summary)
}

/// The result of probing one destination from one namespace with TCP, UDP and ICMP.
#[derive(Clone, Debug)]
pub struct Reach {
    pub from: String,
    pub to: IpAddr,
    pub tcp: TcpOutcome,
    pub udp: UdpOutcome,
    pub icmp: (bool, String),
    /// The destination's TCP server received this probe's nonce.
    pub tcp_seen: bool,
    /// The destination's UDP server received this probe's nonce.
    pub udp_seen: bool,
}

impl Reach {
    /// Every protocol got through and back.
    pub fn is_open(&self) -> bool {
        self.tcp == TcpOutcome::Echoed
            && self.udp == UdpOutcome::Echoed
            && self.icmp.0
            && self.tcp_seen
            && self.udp_seen
    }

    /// Rejected at the cell the way egress-guard rejects: TCP reset fast, UDP not delivered
    /// (and no echo), ping unanswered, and the server saw nothing.
    pub fn is_rejected(&self) -> bool {
        matches!(self.tcp, TcpOutcome::Refused(d) if d < FAST_REJECT)
            && self.udp != UdpOutcome::Echoed
            && !self.icmp.0
            && !self.tcp_seen
            && !self.udp_seen
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}: tcp {:?} (server saw it: {}), udp {:?} (server saw it: {}), icmp {} [{}]",
            self.from,
            self.to,
            self.tcp,
            self.tcp_seen,
            self.udp,
            self.udp_seen,
            if self.icmp.0 {
                "answered"
            } else {
                "unanswered"
            },
            self.icmp.1
        )
    }
}

/// Probes `to` from namespace `from` with TCP, UDP and ICMP. `log` is the log of the echo
/// servers listening at `to`.
pub fn reach(from: &str, to: impl Into<IpAddr>, log: &HitLog) -> Reach {
    let to: IpAddr = to.into();
    let (tcp_outcome, tcp_nonce) = tcp(from, SocketAddr::new(to, TCP_PORT));
    let (udp_outcome, udp_nonce) = udp(from, SocketAddr::new(to, UDP_PORT));
    let icmp = ping(from, to);
    // A server records a hit just before or after replying; give a late record a moment.
    std::thread::sleep(Duration::from_millis(20));
    Reach {
        from: from.to_string(),
        to,
        tcp_seen: seen(log, Proto::Tcp, &tcp_nonce),
        udp_seen: seen(log, Proto::Udp, &udp_nonce),
        tcp: tcp_outcome,
        udp: udp_outcome,
        icmp,
    }
}

/// Whether any server recorded `payload` over `proto`.
pub fn seen(log: &HitLog, proto: Proto, payload: &str) -> bool {
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|h| h.proto == proto && h.payload == payload)
}

/// Whether any server in namespace `ns` recorded a hit from source address `src`.
pub fn seen_from(log: &HitLog, ns: &str, src: impl Into<IpAddr>) -> bool {
    let src: IpAddr = src.into();
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|h| h.ns == ns && h.from.ip() == src)
}
