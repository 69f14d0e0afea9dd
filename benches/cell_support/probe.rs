//! Traffic from inside containers: a TCP prober for exemption latency and a UDP generator
//! for packets per second.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cell::{INET_HOST, PROBE_PORT};
use super::cmd::{enter_netns, in_netns};

/// Pause between two connection attempts: fine enough for a millisecond-scale latency, coarse
/// enough that the prober does not starve the agent of CPU on a 2-core machine.
const PROBE_GAP: Duration = Duration::from_micros(250);
/// One attempt waits at most this long for SYN-ACK or RST (both come back in well under 1 ms
/// when the path works; a silent drop would otherwise stall the measurement).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);

/// What one connection attempt to the internet namespace got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Connected: the container can reach the internet.
    Open,
    /// TCP reset (egress-guard's `reject with tcp reset`).
    Refused,
    /// No answer, or another error.
    Other,
}

fn attempt(dst: SocketAddr) -> Attempt {
    match TcpStream::connect_timeout(&dst, ATTEMPT_TIMEOUT) {
        Ok(_) => Attempt::Open,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Attempt::Refused,
        Err(_) => Attempt::Other,
    }
}

enum Command {
    /// Attempt once, report the outcome.
    Once,
    /// Attempt until the outcome is the given one or the deadline passes; report when it was
    /// first seen.
    Until(Attempt, Instant),
}

/// A thread living in one container namespace, probing the internet namespace on request.
pub struct Prober {
    tx: Option<Sender<Command>>,
    rx: Receiver<Result<(Attempt, Instant), Attempt>>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    pub fn start(ns: &str) -> Prober {
        let (tx, cmd_rx) = channel::<Command>();
        let (res_tx, rx) = channel();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let dst = SocketAddr::V4(SocketAddrV4::new(INET_HOST, PROBE_PORT));
            while let Ok(command) = cmd_rx.recv() {
                let result = match command {
                    Command::Once => Ok((attempt(dst), Instant::now())),
                    Command::Until(want, deadline) => loop {
                        let got = attempt(dst);
                        let at = Instant::now();
                        if got == want {
                            break Ok((got, at));
                        }
                        if at > deadline {
                            break Err(got);
                        }
                        std::thread::sleep(PROBE_GAP);
                    },
                };
                if res_tx.send(result).is_err() {
                    return;
                }
            }
        });
        Prober {
            tx: Some(tx),
            rx,
            thread: Some(thread),
        }
    }

    fn ask(&self, command: Command) -> Result<(Attempt, Instant), Attempt> {
        self.tx
            .as_ref()
            .expect("prober running")
            .send(command)
            .expect("prober alive");
        self.rx.recv().expect("prober answers")
    }

    pub fn once(&self) -> Attempt {
        match self.ask(Command::Once) {
            Ok((a, _)) | Err(a) => a,
        }
    }

    /// When `want` was first seen, or None if not within `timeout`.
    pub fn until(&self, want: Attempt, timeout: Duration) -> Option<Instant> {
        self.ask(Command::Until(want, Instant::now() + timeout))
            .ok()
            .map(|(_, at)| at)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends 18-byte UDP datagrams from namespace `ns` to `dst` as fast as one thread can for
/// `secs`. Unconnected, so ICMP errors from rejects do not interrupt it. Returns datagrams the
/// kernel accepted.
pub fn flood(ns: &str, dst: Ipv4Addr, port: u16, duration: Duration) -> u64 {
    in_netns(ns, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind generator");
        let to = SocketAddrV4::new(dst, port);
        let payload = [0x5au8; 18];
        let mut sent = 0u64;
        let end = Instant::now() + duration;
        loop {
            for _ in 0..256 {
                if socket.send_to(&payload, to).is_ok() {
                    sent += 1;
                }
            }
            if Instant::now() >= end {
                return sent;
            }
        }
    })
}
