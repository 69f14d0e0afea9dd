//! Raw HTTP/1.1 to the agent's health endpoint, from inside a network namespace (the agent
//! listens on 127.0.0.1 of the cell namespace). Deliberately hand-rolled: tests send malformed
//! requests too, and see exactly what comes back.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use super::probe::in_netns;

/// Bound on connect, send and receive of one request.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One answer.
#[derive(Clone, Debug)]
pub struct Response {
    pub code: u16,
    /// Status line and headers.
    pub head: String,
    pub body: String,
}

impl Response {
    /// The first header `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as JSON; panics (with the body) if it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "body of HTTP {} is not JSON ({e}):\n{}{}",
                self.code, self.head, self.body
            )
        })
    }
}

/// Parses a whole HTTP response; None if it is not one.
pub fn parse(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut status = head.lines().next()?.split(' ');
    if !status.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = status.next()?.parse().ok()?;
    Some(Response {
        code,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// A TCP connection to 127.0.0.1:`port`, made inside namespace `ns` (the socket stays there).
pub fn connect(ns: &str, port: u16) -> io::Result<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = in_netns(ns, || TcpStream::connect_timeout(&addr, TIMEOUT))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Reads until the server closes; data received before a reset still counts.
pub fn read_all(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {
                return Ok(raw);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends `request` verbatim and reads the whole answer (the server closes after one).
pub fn exchange(ns: &str, port: u16, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = connect(ns, port)?;
    stream.write_all(request)?;
    read_all(&mut stream)
}

/// Like [`exchange`], parsed; an answer that is not HTTP is an `InvalidData` error.
pub fn try_request(ns: &str, port: u16, request: &[u8]) -> io::Result<Response> {
    let raw = exchange(ns, port, request)?;
    parse(&raw).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// `GET path` as a well-behaved client; io errors are returned.
pub fn try_get(ns: &str, port: u16, path: &str) -> io::Result<Response> {
    try_request(
        ns,
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
}

/// `GET path`; panics if the endpoint does not answer HTTP.
#[track_caller]
pub fn get(ns: &str, port: u16, path: &str) -> Response {
    try_get(ns, port, path)
        .unwrap_or_else(|e| panic!("GET {path} on 127.0.0.1:{port} in {ns}: {e}"))
}

/// The value of one series (`name` or `name{labels}`, exactly as written) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Polls `GET path` on `ns:port` until `cond` holds (connection errors count as "not yet");
/// panics naming `what` and the last answer after `timeout`.
#[track_caller]
pub fn wait_for(
    ns: &str,
    port: u16,
    path: &str,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&Response) -> bool,
) -> Response {
    let start = std::time::Instant::now();
    loop {
        let last = match try_get(ns, port, path) {
            Ok(r) if cond(&r) => return r,
            Ok(r) => format!("{}\r\n\r\n{}", r.head, r.body),
            Err(e) => format!("error: {e}"),
        };
        assert!(
            start.elapsed() <= timeout,
            "timed out after {timeout:?} waiting for {what} (GET {path}); last answer:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
