//! The edge: one nf_tables netlink socket, batches sent and acknowledged, dumps read.
//!
//! The agent keeps one socket for its whole life: the owned table is bound to its port id,
//! so the kernel removes that table when (and only when) the socket closes. Every wait is
//! bounded: a kernel that does not answer is an error, never a stalled loop.

use std::io;
use std::time::Duration;

use netlink_packet_core::{NLA_TYPE_MASK, NetlinkMessage, NetlinkPayload, NlasIterator, Parseable};
use netlink_packet_netfilter::nftables::{
    ExpressionAttribute, ListAttribute, NfTablesMessage, RuleAttribute, RuleMessage,
    SetElementAttribute, SetElementList, SetElementMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};

use super::batch::{Batch, EncodedBatch};
use super::dump::{self, DumpKind};
use crate::wire::{self, Message, NLMSG_DONE, NLMSG_ERROR};

/// How long the kernel may take to answer a batch or a dump.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// After the first refusal, how long to wait for the rest of the batch's answers.
const AFTER_ERROR: Duration = Duration::from_millis(200);
/// Receive buffer: a dump of a few thousand elements arrives in bursts.
const RCVBUF: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open an nf_tables netlink socket: {0}")]
    Open(io::Error),
    #[error("cannot send to nf_tables: {0}")]
    Send(io::Error),
    #[error("cannot receive from nf_tables: {0}")]
    Recv(io::Error),
    #[error("nf_tables did not answer {what} within {ANSWER_TIMEOUT:?}")]
    Timeout { what: String },
    #[error("the kernel refused `{operation}`: {errno} ({})", errno.desc())]
    Refused {
        operation: String,
        /// Index of the refused operation in the batch.
        index: usize,
        errno: Errno,
    },
    #[error("the kernel refused the batch: {errno} ({})", errno.desc())]
    BatchRefused { errno: Errno },
    #[error("dump of {what} failed: {errno} ({})", errno.desc())]
    DumpFailed { what: String, errno: Errno },
    #[error("cannot parse the kernel's answer to {what}: {message}")]
    Decode { what: String, message: String },
}

impl NetlinkError {
    /// The errno the kernel answered with, if that is what this is.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetlinkError::Refused { errno, .. }
            | NetlinkError::BatchRefused { errno }
            | NetlinkError::DumpFailed { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What the dataplane needs from the kernel: the real socket, or a fake in tests.
pub trait Transport: Send {
    /// The socket's netlink port id (owner of the owned table; sender of our NEWGENs).
    fn port_id(&self) -> u32;
    /// Applies one batch atomically; Ok means every operation was accepted.
    fn apply(&mut self, batch: &Batch) -> impl Future<Output = Result<usize, NetlinkError>> + Send;
    /// Runs one dump and returns its nf_tables messages.
    fn dump(
        &mut self,
        kind: DumpKind,
    ) -> impl Future<Output = Result<Vec<NfTablesMessage>, NetlinkError>> + Send;
    /// Runs one dump, handing each message to `sink` as it is decoded (a listing of thousands
    /// of set elements never holds every decoded message at once).
    fn dump_into(
        &mut self,
        kind: DumpKind,
        sink: &mut (dyn FnMut(NfTablesMessage) + Send),
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send {
        async move {
            for message in self.dump(kind).await? {
                sink(message);
            }
            Ok(())
        }
    }
}

/// The agent's nf_tables socket.
pub struct NetlinkSocket {
    socket: TokioSocket,
    port: u32,
    seq: u32,
}

impl NetlinkSocket {
    /// Opens and binds a socket; must be called inside a tokio runtime.
    pub fn open() -> Result<NetlinkSocket, NetlinkError> {
        let mut socket =
            TokioSocket::new(protocols::NETLINK_NETFILTER).map_err(NetlinkError::Open)?;
        let raw = socket.socket_mut();
        raw.bind(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Open)?;
        let mut address = SocketAddr::new(0, 0);
        raw.get_address(&mut address).map_err(NetlinkError::Open)?;
        // Errors carry only the header of the refused message, not all of it back.
        let _ = raw.set_cap_ack(true);
        let _ = raw.set_ext_ack(true);
        // Best effort; FORCE needs CAP_NET_ADMIN, which the agent has.
        if setsockopt(&*raw, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = raw.set_rx_buf_sz(RCVBUF);
        }
        Ok(NetlinkSocket {
            socket,
            port: address.port_number(),
            seq: std::process::id().wrapping_mul(7919),
        })
    }

    fn next_seq(&mut self, count: u32) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(count + 1);
        first
    }

    /// Makes room for a batch of `len` bytes: the kernel refuses a message larger than the
    /// socket's send buffer.
    fn ensure_sndbuf(&self, len: usize) {
        let wanted = len.saturating_mul(2).max(1 << 20);
        let _ = setsockopt(self.socket.socket_ref(), sockopt::SndBufForce, &wanted);
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), NetlinkError> {
        let sent = tokio::time::timeout(ANSWER_TIMEOUT, self.socket.send(bytes))
            .await
            .map_err(|_| NetlinkError::Timeout {
                what: "a send".into(),
            })?
            .map_err(NetlinkError::Send)?;
        if sent != bytes.len() {
            return Err(NetlinkError::Send(io::Error::other(format!(
                "sent {sent} of {} bytes",
                bytes.len()
            ))));
        }
        Ok(())
    }

    async fn recv(
        &mut self,
        what: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<u8>, NetlinkError> {
        match tokio::time::timeout_at(deadline, self.socket.recv_from_full()).await {
            Ok(Ok((bytes, _))) => Ok(bytes),
            Ok(Err(err)) => Err(NetlinkError::Recv(err)),
            Err(_) => Err(NetlinkError::Timeout { what: what.into() }),
        }
    }

    async fn apply_encoded(
        &mut self,
        batch: &Batch,
        encoded: &EncodedBatch,
    ) -> Result<(), NetlinkError> {
        self.ensure_sndbuf(encoded.bytes.len());
        self.send(&encoded.bytes).await?;
        let first_seq = encoded.acked.first().map(|(s, _)| *s).unwrap_or(0);
        let begin_seq = first_seq.wrapping_sub(1);
        let mut pending: std::collections::BTreeMap<u32, usize> =
            encoded.acked.iter().copied().collect();
        let mut deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let mut refusal: Option<NetlinkError> = None;
        while !pending.is_empty() {
            let datagram = match self.recv("a batch", deadline).await {
                Ok(d) => d,
                Err(NetlinkError::Timeout { .. }) if refusal.is_some() => break,
                Err(err) => return Err(err),
            };
            for Message {
                kind, seq, payload, ..
            } in wire::messages(&datagram)
            {
                if kind != NLMSG_ERROR {
                    continue;
                }
                let code = wire::error_code(payload);
                if seq == begin_seq && code != 0 {
                    return Err(NetlinkError::BatchRefused {
                        errno: Errno::from_raw(-code),
                    });
                }
                let Some(index) = pending.remove(&seq) else {
                    continue;
                };
                if code != 0 && refusal.is_none() {
                    refusal = Some(NetlinkError::Refused {
                        operation: batch.ops[index].describe(),
                        index,
                        errno: Errno::from_raw(-code),
                    });
                    deadline = tokio::time::Instant::now() + AFTER_ERROR;
                }
            }
        }
        match refusal {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    async fn dump_kind(
        &mut self,
        kind: DumpKind,
        sink: &mut (dyn FnMut(NfTablesMessage) + Send),
    ) -> Result<(), NetlinkError> {
        let seq = self.next_seq(1);
        let what = format!("{kind:?}");
        self.send(&dump::request(kind, seq)).await?;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let datagram = self.recv(&what, deadline).await?;
            for Message {
                kind: message_type,
                seq: message_seq,
                payload,
                whole,
                ..
            } in wire::messages(&datagram)
            {
                if message_seq != seq {
                    continue;
                }
                match message_type {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = wire::error_code(payload);
                        if code == 0 {
                            return Ok(());
                        }
                        let errno = Errno::from_raw(-code);
                        // Asking for the elements of a set that is not there: nothing to list.
                        if errno == Errno::ENOENT {
                            return Ok(());
                        }
                        return Err(NetlinkError::DumpFailed { what, errno });
                    }
                    // A message the parser cannot read is skipped: if it was part of the agent's
                    // tables, the comparison sees it missing and rewrites the table.
                    _ => match decode(whole, &what) {
                        Ok(message) => sink(message),
                        Err(err) => {
                            tracing::debug!(error = %err, "skipping an unreadable nf_tables message")
                        }
                    },
                }
            }
        }
    }
}

impl Transport for NetlinkSocket {
    fn port_id(&self) -> u32 {
        self.port
    }

    async fn apply(&mut self, batch: &Batch) -> Result<usize, NetlinkError> {
        if batch.is_empty() {
            return Ok(0);
        }
        // Every message counts, BEGIN and END included.
        let count = u32::try_from(batch.ops.len() * 2 + 64).unwrap_or(u32::MAX / 2);
        let first = self.next_seq(count);
        let encoded = batch.encode(first);
        // Reserve what the encoding really used (element lists may split into more messages).
        let used = u32::try_from(encoded.acked.len() + 2).unwrap_or(u32::MAX / 2);
        self.seq = self.seq.max(first.wrapping_add(used));
        let len = encoded.bytes.len();
        self.apply_encoded(batch, &encoded).await.map(|()| len)
    }

    async fn dump(&mut self, kind: DumpKind) -> Result<Vec<NfTablesMessage>, NetlinkError> {
        let mut out = Vec::new();
        self.dump_kind(kind, &mut |message| out.push(message))
            .await?;
        Ok(out)
    }

    async fn dump_into(
        &mut self,
        kind: DumpKind,
        sink: &mut (dyn FnMut(NfTablesMessage) + Send),
    ) -> Result<(), NetlinkError> {
        self.dump_kind(kind, sink).await
    }
}

/// Parses one whole netlink message as an nf_tables message.
fn decode(message: &[u8], what: &str) -> Result<NfTablesMessage, NetlinkError> {
    if let Some(elements) = decode_set_elements(message) {
        return Ok(elements);
    }
    if let Some(rule) = decode_rule(message) {
        return Ok(rule);
    }
    let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(message).map_err(|err| {
        NetlinkError::Decode {
            what: what.into(),
            message: err.to_string(),
        }
    })?;
    match parsed.payload {
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(message),
            ..
        }) => Ok(message),
        other => Err(NetlinkError::Decode {
            what: what.into(),
            message: format!("not an nf_tables message: {other:?}"),
        }),
    }
}

/// A reply of a dump (whole netlink message) as the agent's socket parses it (benchmarks).
#[doc(hidden)]
pub fn decode_reply(message: &[u8]) -> Result<NfTablesMessage, NetlinkError> {
    decode(message, "dump reply")
}

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM`, and `NFTA_SET_ELEM_LIST_ELEMENTS`.
const NEWSETELEM: u16 = 10 << 8 | 12;
const SET_ELEM_LIST_ELEMENTS: u16 = 3;
/// `struct nlmsghdr` and `struct nfgenmsg`.
const HEADERS_LEN: usize = wire::NLMSG_HDRLEN + 4;

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE`, and `NFTA_RULE_EXPRESSIONS`.
const NEWRULE: u16 = 10 << 8 | 6;
const RULE_EXPRESSIONS: u16 = 4;

/// An `NFT_MSG_NEWRULE` message parsed here, expression by expression, for the same reason as
/// [`decode_set_elements`]: the crate's list parser formats the rest of the list for every
/// expression, 57 ms for a listing of two tables with 50 `[[rules]]` (640 rules), 13 ms this
/// way (`cargo bench --bench pure -- decode_listing` with `EGRESS_GUARD_BENCH_RULES=50`).
/// None for any other message or one this cannot parse.
pub(super) fn decode_rule(message: &[u8]) -> Option<NfTablesMessage> {
    let kind = u16::from_ne_bytes(message.get(4..6)?.try_into().ok()?);
    let len = u32::from_ne_bytes(message.get(0..4)?.try_into().ok()?) as usize;
    if kind != NEWRULE || len != message.len() {
        return None;
    }
    let mut attributes = Vec::new();
    for nla in NlasIterator::new(message.get(HEADERS_LEN..)?) {
        let nla = nla.ok()?;
        if nla.kind() & NLA_TYPE_MASK == RULE_EXPRESSIONS {
            let items = NlasIterator::new(nla.value())
                .map(|item| ListAttribute::<ExpressionAttribute>::parse(&item.ok()?).ok())
                .collect::<Option<Vec<_>>>()?;
            attributes.push(RuleAttribute::Expressions(items));
        } else {
            attributes.push(RuleAttribute::parse(&nla).ok()?);
        }
    }
    Some(NfTablesMessage::NewRule(RuleMessage { attributes }))
}

/// An `NFT_MSG_NEWSETELEM` message parsed here, element by element, into the crate's types;
/// None for any other message, or one this cannot parse (the crate's parser then decides).
/// netlink-packet-netfilter 0.4.0 builds the error context of its list parser eagerly, with
/// `format!("{:?}")` of the rest of the list for every element, which makes a message of n
/// elements cost n² (45 ms to decode a listing of 5,000 exemptions, 2.4 ms for 1,000).
pub(super) fn decode_set_elements(message: &[u8]) -> Option<NfTablesMessage> {
    let kind = u16::from_ne_bytes(message.get(4..6)?.try_into().ok()?);
    let len = u32::from_ne_bytes(message.get(0..4)?.try_into().ok()?) as usize;
    if kind != NEWSETELEM || len != message.len() {
        return None;
    }
    let mut attributes = Vec::new();
    for nla in NlasIterator::new(message.get(HEADERS_LEN..)?) {
        let nla = nla.ok()?;
        if nla.kind() & NLA_TYPE_MASK == SET_ELEM_LIST_ELEMENTS {
            let items = NlasIterator::new(nla.value())
                .map(|item| ListAttribute::<SetElementAttribute>::parse(&item.ok()?).ok())
                .collect::<Option<Vec<_>>>()?;
            attributes.push(SetElementList::Elements(items));
        } else {
            attributes.push(SetElementList::parse(&nla).ok()?);
        }
    }
    Some(NfTablesMessage::NewSetElement(SetElementMessage {
        attributes,
    }))
}
