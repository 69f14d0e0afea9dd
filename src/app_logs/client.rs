//! The sender: queued attempts -> lines -> `loggregator.v2.Ingress/Send` over gRPC with mutual
//! TLS (tonic on rustls with the ring provider). One connection, made again with backoff when it
//! fails; while there is none the queue fills and attribution drops (and counts) what does not
//! fit, so nothing else waits for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::message::{EnvelopeBatch, SEND_PATH, SendResponse};
use super::{AppLogCounts, Envelope, Lines, MAX_BATCH};
use crate::attribution::AppAttempt;
use crate::config::LoggregatorConfig;

/// Bounds of the wait between two connection attempts.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long one connection attempt or one send may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the minutes that are over are summarised.
const TICK: Duration = Duration::from_secs(1);

/// Why a send did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the forwarder agent at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("the forwarder agent refused the lines: {0}")]
    Call(#[from] tonic::Status),
}

pub async fn run(
    config: LoggregatorConfig,
    mut attempts: mpsc::Receiver<AppAttempt>,
    mut lines: Lines,
    counts: Arc<AppLogCounts>,
) {
    let mut ticker = tokio::time::interval(TICK);
    let mut channel: Option<Channel> = None;
    let mut backoff = BACKOFF_MIN;
    let mut next_connect = tokio::time::Instant::now();
    loop {
        let mut batch: Vec<Envelope> = Vec::new();
        tokio::select! {
            attempt = attempts.recv() => {
                let Some(attempt) = attempt else { return };
                batch.extend(lines.attempt(&attempt, SystemTime::now()));
                // Whatever else is queued goes in the same call.
                while batch.len() < MAX_BATCH {
                    let Ok(more) = attempts.try_recv() else { break };
                    batch.extend(lines.attempt(&more, SystemTime::now()));
                }
            }
            _ = ticker.tick() => batch.extend(lines.due(SystemTime::now())),
        }
        if batch.is_empty() {
            continue;
        }
        if channel.is_none() {
            if tokio::time::Instant::now() < next_connect {
                counts
                    .failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                continue;
            }
            match connect(&config).await {
                Ok(connected) => {
                    channel = Some(connected);
                    backoff = BACKOFF_MIN;
                }
                Err(err) => {
                    fail(&counts, batch.len(), &err);
                    next_connect = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let Some(connected) = channel.clone() else {
            continue;
        };
        let size = batch.len() as u64;
        match send(connected, batch).await {
            Ok(()) => {
                counts.sent.fetch_add(size, Ordering::Relaxed);
                counts.connected.store(true, Ordering::Relaxed);
            }
            Err(err) => {
                fail(&counts, size as usize, &err);
                channel = None;
                next_connect = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn fail(counts: &AppLogCounts, lines: usize, err: &SendError) {
    if counts.connected.swap(false, Ordering::Relaxed) || counts.failed.load(Ordering::Relaxed) == 0
    {
        tracing::warn!(error = %err, "app log lines cannot reach the forwarder agent; enforcement is unaffected");
    }
    counts.failed.fetch_add(lines as u64, Ordering::Relaxed);
}

async fn connect(config: &LoggregatorConfig) -> Result<Channel, SendError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| SendError::Read {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(
            "CA certificate",
            &config.ca_cert,
        )?))
        .identity(Identity::from_pem(
            read("certificate", &config.cert)?,
            read("key", &config.key)?,
        ))
        .domain_name(config.server_name.clone());
    let address = config.address.to_string();
    let connect_error = |source| SendError::Connect {
        address: address.clone(),
        source,
    };
    Endpoint::from_shared(format!("https://{address}"))
        .map_err(connect_error)?
        .tls_config(tls)
        .map_err(connect_error)?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(connect_error)
}

async fn send(channel: Channel, batch: Vec<Envelope>) -> Result<(), SendError> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let codec = tonic_prost::ProstCodec::<EnvelopeBatch, SendResponse>::default();
    grpc.unary(
        tonic::Request::new(EnvelopeBatch { batch }),
        PathAndQuery::from_static(SEND_PATH),
        codec,
    )
    .await?;
    Ok(())
}
