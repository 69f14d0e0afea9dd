//! nf_tables events: who else changed the ruleset.
//!
//! Every committed nf_tables transaction ends with a NEWGEN message whose netlink header names
//! the port id of the socket that committed it. The agent's own transactions come from its one
//! socket; any other port id is someone else (an `nft flush ruleset`, a deleted table, an
//! added rule, or just iptables-nft), so the loop looks at its tables again at once.

use std::sync::Arc;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols};
use tokio::sync::Notify;

use crate::change_flag::ChangeFlag;
use crate::wire;

/// nfnetlink group of nf_tables ruleset changes (`NFNLGRP_NFTABLES`).
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN`.
const NEWGEN: u16 = (10 << 8) | 15;
/// Receive buffer; an overrun is harmless (everything counts as changed) but rarer is cheaper.
const EVENT_RCVBUF: usize = 1 << 20;
/// Give up after this many receive errors in a row (the loop then lists every pass).
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

/// Whether a datagram of nf_tables events holds a transaction committed by a socket other than
/// `own_port`.
pub fn foreign_commit(datagram: &[u8], own_port: u32) -> bool {
    wire::messages(datagram).any(|message| message.kind == NEWGEN && message.port != own_port)
}

/// Marks `ruleset` changed and wakes `trigger` on every foreign transaction (and on a receive
/// error, such as an overrun). Runs until the socket fails for good.
pub async fn watch(
    own_port: u32,
    trigger: Arc<Notify>,
    ruleset: Arc<ChangeFlag>,
) -> std::io::Result<()> {
    let mut socket = TokioSocket::new(protocols::NETLINK_NETFILTER)?;
    socket.socket_mut().bind(&SocketAddr::new(0, 0))?;
    socket.socket_mut().add_membership(NFNLGRP_NFTABLES)?;
    let _ = socket.socket_mut().set_rx_buf_sz(EVENT_RCVBUF);
    ruleset.watching(true);
    let mut consecutive_errors = 0u32;
    let result = loop {
        let foreign = match socket.recv_from_full().await {
            Ok((datagram, _)) => {
                consecutive_errors = 0;
                foreign_commit(&datagram, own_port)
            }
            Err(err) => {
                consecutive_errors += 1;
                tracing::debug!(error = %err, "nf_tables event socket error; re-listing");
                if consecutive_errors > MAX_CONSECUTIVE_ERRORS {
                    break Err(err);
                }
                true
            }
        };
        if foreign {
            ruleset.mark();
            trigger.notify_one();
        }
    };
    ruleset.watching(false);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, port: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&20u32.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&port.to_ne_bytes());
        out.extend_from_slice(&[1, 0, 0, 0]);
        out
    }

    #[test]
    fn own_transactions_are_not_news() {
        let mut datagram = message(10 << 8, 77); // NEWTABLE
        datagram.extend(message(NEWGEN, 77));
        assert!(!foreign_commit(&datagram, 77));
        assert!(foreign_commit(&datagram, 78));
        // Only NEWGEN counts: a datagram of other messages alone is not a commit.
        assert!(!foreign_commit(&message(10 << 8, 5), 77));
        // Malformed input is not a commit and does not panic.
        assert!(!foreign_commit(&[1, 2, 3], 77));
    }
}
