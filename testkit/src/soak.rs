//! The soak's traffic: a prober that sends, as fast as one thread can, from every running
//! container to the internet namespace, and receivers there that record what arrives.
//!
//! Ports tell restricted from exempt traffic, whatever the source IP (IPs are reused):
//! - [`RESTRICTED_PORT`]: every probe from a container that must be restricted (app, task, and a
//!   staging container before its store entry exists). Anything arriving there is a leak.
//! - [`STAGING_PORT`]: probes from a staging container after its store entry was written; they
//!   should get through once the agent has exempted it.
//!
//! Leaks are counted by an nftables counter at the internet namespace's prerouting hook (ground
//! truth: it sees every packet that arrives, before any socket buffer), and attributed to a time
//! by a UDP receiver (payload: container, sequence number, send time).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;
use nix::sched::{CloneFlags, setns};

use crate::probe::in_netns;

/// Destination port of probes that must never arrive.
pub const RESTRICTED_PORT: u16 = 7001;
/// Destination port of probes from exempted staging containers.
pub const STAGING_PORT: u16 = 7002;
/// Every this many rounds, each restricted container also sends a TCP SYN.
const TCP_EVERY: u64 = 16;

/// nft script for the internet namespace: ground-truth counters of arrivals per port.
pub fn inet_counters_script() -> String {
    format!(
        "table inet soak {{
  counter leak_udp {{ }}
  counter leak_tcp {{ }}
  counter staging_udp {{ }}
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr 10.255.0.0/16 udp dport {RESTRICTED_PORT} counter name \"leak_udp\"
    ip saddr 10.255.0.0/16 tcp dport {RESTRICTED_PORT} counter name \"leak_tcp\"
    ip saddr 10.255.0.0/16 udp dport {STAGING_PORT} counter name \"staging_udp\"
  }}
}}
"
    )
}

/// Microseconds since `epoch`.
fn micros(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
}

/// A probe that arrived: container, sequence number, send time (µs since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Arrival {
    pub name: String,
    pub seq: u64,
    pub sent_us: u64,
}

/// A UDP receiver in a namespace, recording every datagram's payload until dropped.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    got: Arc<Mutex<Vec<Arrival>>>,
}

fn set_rcvbuf(socket: &UdpSocket, bytes: i32) {
    // SAFETY: setsockopt on a valid fd with a pointer to an int of the size passed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

impl Receiver {
    pub fn start(ns: &str, ip: Ipv4Addr, port: u16) -> Receiver {
        let socket = in_netns(ns, || UdpSocket::bind((ip, port)).expect("bind receiver"));
        set_rcvbuf(&socket, 8 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (stop2, got2) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let mut parts = text.split(' ');
                    let (Some(name), Some(seq), Some(sent)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let (Ok(seq), Ok(sent_us)) = (seq.parse(), sent.parse()) else {
                        continue;
                    };
                    got2.lock().expect("arrivals").push(Arrival {
                        name: name.to_string(),
                        seq,
                        sent_us,
                    });
                }
            }
        });
        Receiver {
            stop,
            thread: Some(thread),
            got,
        }
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.got.lock().expect("arrivals").clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a probed container is, as far as the prober is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Must be restricted: probes go to [`RESTRICTED_PORT`].
    Restricted,
    /// Staging, store entry written at `since`: probes go to [`STAGING_PORT`].
    Staging { since: Instant },
}

/// One probed container and what was sent from it.
pub struct Target {
    pub name: String,
    pub phase: Phase,
    netns: File,
    restricted: UdpSocket,
    staging: UdpSocket,
    seq: u64,
    /// Successful sends to the restricted port (UDP) and TCP connection attempts.
    pub restricted_udp: u64,
    pub restricted_tcp: u64,
    /// (sequence, send time µs) of every probe sent in the staging phase.
    pub staging_sends: Vec<(u64, u64)>,
}

impl Target {
    /// Sockets for container namespace `ns`, connected to `inet`'s two probe ports.
    pub fn new(name: &str, ns: &str, inet: Ipv4Addr) -> Target {
        let (restricted, staging) = in_netns(ns, || {
            let open = |port| {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind probe socket");
                s.connect(SocketAddrV4::new(inet, port))
                    .expect("connect probe socket");
                s.set_nonblocking(true).expect("nonblocking");
                s
            };
            (open(RESTRICTED_PORT), open(STAGING_PORT))
        });
        let netns = File::open(format!("/run/netns/{ns}")).expect("open container netns");
        Target {
            name: name.to_string(),
            phase: Phase::Restricted,
            netns,
            restricted,
            staging,
            seq: 0,
            restricted_udp: 0,
            restricted_tcp: 0,
            staging_sends: Vec::new(),
        }
    }
}

/// Sends from every target, round after round, on one thread, until dropped.
pub struct Prober {
    pub targets: Arc<Mutex<BTreeMap<String, Target>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub epoch: Instant,
}

impl Prober {
    pub fn start(inet: Ipv4Addr, epoch: Instant) -> Prober {
        let targets: Arc<Mutex<BTreeMap<String, Target>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (targets2, stop2) = (targets.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let tcp_dst = SocketAddr::V4(SocketAddrV4::new(inet, RESTRICTED_PORT));
            let mut round = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                round += 1;
                {
                    let mut targets = targets2.lock().expect("targets");
                    for t in targets.values_mut() {
                        t.seq += 1;
                        let now = Instant::now();
                        let payload = format!("{} {} {}", t.name, t.seq, micros(epoch, now));
                        match t.phase {
                            Phase::Restricted => {
                                // An error here is the ICMP reject of an earlier probe being
                                // reported on the connected socket: nothing was sent.
                                if t.restricted.send(payload.as_bytes()).is_ok() {
                                    t.restricted_udp += 1;
                                }
                                if round.is_multiple_of(TCP_EVERY)
                                    && setns(&t.netns, CloneFlags::CLONE_NEWNET).is_ok()
                                {
                                    // A SYN either way: RST from the cell (rejected) or from the
                                    // internet host (no listener there): both come back fast.
                                    let _ = TcpStream::connect_timeout(
                                        &tcp_dst,
                                        Duration::from_millis(20),
                                    );
                                    t.restricted_tcp += 1;
                                }
                            }
                            Phase::Staging { .. } => {
                                if t.staging.send(payload.as_bytes()).is_ok() {
                                    t.staging_sends.push((t.seq, micros(epoch, now)));
                                }
                            }
                        }
                    }
                }
                std::thread::yield_now();
            }
        });
        Prober {
            targets,
            stop,
            thread: Some(thread),
            epoch,
        }
    }

    pub fn add(&self, target: Target) {
        self.targets
            .lock()
            .expect("targets")
            .insert(target.name.clone(), target);
    }

    /// Marks `name` staging from `since` on.
    pub fn set_staging(&self, name: &str, since: Instant) {
        if let Some(t) = self.targets.lock().expect("targets").get_mut(name) {
            t.phase = Phase::Staging { since };
        }
    }

    /// Stops probing `name` and returns what was sent from it.
    pub fn remove(&self, name: &str) -> Option<Target> {
        self.targets.lock().expect("targets").remove(name)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One staging container's record, for the report.
#[derive(Clone, Debug)]
pub struct StagingRecord {
    pub name: String,
    /// Store entry written, µs since the epoch.
    pub written_us: u64,
    /// Probing stopped (removal began or the soak ended), µs since the epoch.
    pub ended_us: u64,
    pub sends: Vec<(u64, u64)>,
}

/// How the staging containers fared against the exemption latency budget.
#[derive(Debug, Default)]
pub struct StagingSummary {
    pub containers: usize,
    /// Store write -> send time of the first probe that arrived, ms, per container that got one.
    pub first_ms: Vec<f64>,
    /// Containers none of whose probes arrived.
    pub never: Vec<String>,
    /// Probes sent later than `budget` after the store write.
    pub after_budget_sent: u64,
    /// Of those, probes that did not arrive.
    pub after_budget_failed: u64,
    /// Containers with at least one such failure, with their count.
    pub failing: BTreeMap<String, u64>,
}

/// Compares what staging containers sent with what arrived. Probes sent in the last `tail_us`
/// of a container's life are ignored (in flight or cut by its removal).
pub fn summarize_staging(
    records: &[StagingRecord],
    arrivals: &[Arrival],
    budget: Duration,
    tail_us: u64,
) -> StagingSummary {
    let got: BTreeSet<(&str, u64)> = arrivals.iter().map(|a| (a.name.as_str(), a.seq)).collect();
    let budget_us = u64::try_from(budget.as_micros()).unwrap_or(u64::MAX);
    let mut s = StagingSummary {
        containers: records.len(),
        ..StagingSummary::default()
    };
    for r in records {
        let arrived = |seq: u64| got.contains(&(r.name.as_str(), seq));
        match r.sends.iter().find(|(seq, _)| arrived(*seq)) {
            Some((_, sent)) => s
                .first_ms
                .push(sent.saturating_sub(r.written_us) as f64 / 1000.0),
            None => s.never.push(r.name.clone()),
        }
        for (seq, sent) in &r.sends {
            if *sent < r.written_us + budget_us || *sent + tail_us > r.ended_us {
                continue;
            }
            s.after_budget_sent += 1;
            if !arrived(*seq) {
                s.after_budget_failed += 1;
                *s.failing.entry(r.name.clone()).or_default() += 1;
            }
        }
    }
    s.first_ms.sort_by(f64::total_cmp);
    s
}

/// Nearest-rank percentile of sorted values (NaN when empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Microseconds since `epoch`, for callers.
pub fn since(epoch: Instant) -> u64 {
    micros(epoch, Instant::now())
}
