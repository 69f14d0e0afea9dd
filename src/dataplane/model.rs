//! The typed description of what the agent keeps in the kernel (pure, no I/O).
//!
//! Two tables hold the same rules (see the crate README, "How enforcement works"):
//!
//! - `inet egress_guard`: no flags; it outlives the agent, so enforcement holds while the agent
//!   is stopped, crashed or restarting;
//! - `inet egress_guard_owned`: `NFT_TABLE_F_OWNER`, bound to the agent's netlink socket: no
//!   other process may delete or change it and `nft flush ruleset` skips it.
//!
//! A reject in either is final, so either table alone enforces.
//!
//! Rules are nf_tables expressions exactly as `nft` itself compiles the rules that
//! [`super::render`] prints (checked byte for byte against `nft --debug=netlink`), so that
//! `nft list ruleset` on a cell reads our tables back as `egress-guard render` prints them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::Mode;
use crate::policy::{DesiredRules, Exempt6Key, ExemptKey};

/// The base chain on the forward hook: every packet a container sends off the cell passes it.
pub const FORWARD_CHAIN: &str = "forward";
/// The regular chain holding the decision for overlay-sourced packets.
pub const EGRESS_CHAIN: &str = "overlay_egress";
/// (host ifindex, source IP) pairs of exempt (staging) containers.
pub const EXEMPT_SET: &str = "exempt";
/// Destinations restricted containers may reach (interval set of `allowed_networks`).
pub const ALLOWED_SET: &str = "allowed";
pub const COUNTER_TCP: &str = "rejected_tcp";
pub const COUNTER_OTHER: &str = "rejected_other";
/// The IPv6 decision for packets that entered the cell from a container's veth.
pub const EGRESS6_CHAIN: &str = "overlay6_egress";
/// (host ifindex, source IPv6) pairs of exempt (staging) containers.
pub const EXEMPT6_SET: &str = "exempt6";
/// IPv6 destinations restricted containers may reach (the IPv6 `allowed_networks`).
pub const ALLOWED6_SET: &str = "allowed6";
pub const COUNTER6_TCP: &str = "rejected6_tcp";
pub const COUNTER6_OTHER: &str = "rejected6_other";
/// Every packet the rules match, before the rate limit, in either mode (issue 11).
pub const COUNTER_BLOCKED: &str = "blocked";
/// The packets the rate limit let through to the NFLOG group: `blocked - blocked_logged` is
/// what the limit suppressed, read from one counter dump (both kernel counters, no race with
/// the agent's socket).
pub const COUNTER_LOGGED: &str = "blocked_logged";
/// The NFLOG group the rules hand matched packets to, read by the agent
/// ([`super::netlink::nflog`]). Per network namespace; one listener per group (a second bind
/// gets EBUSY). 9851, like the health port: distinctive, and far from the 0..=3 that
/// `iptables -j NFLOG` and ulogd configurations usually take.
pub const NFLOG_GROUP: u16 = 9851;
/// Kernel-side bound on what reaches NFLOG, per table: a token bucket of
/// [`LOG_BURST`] packets refilled at this rate. Under a flood of any size the agent parses at
/// most about 2 × (rate + burst) messages a second (two tables), a few hundred microseconds of
/// CPU; everything above is counted (`blocked`) but not copied to user space.
pub const LOG_RATE_PER_SECOND: u64 = 200;
pub const LOG_BURST: u32 = 100;
/// `enum nft_limit_type`: packets.
pub const LIMIT_PKTS: u32 = 0;
/// `filter - 10`: ahead of the iptables filter table (priority 0, legacy or nf_tables backend),
/// so our reject is final whatever ACCEPT silk, the policy agent or an ASG adds later.
pub const FORWARD_PRIORITY: i32 = -10;

/// The DNS filter's base chain (`[dns] enabled`): redirects restricted containers' DNS
/// queries to the agent's listener.
pub const DNS_CHAIN: &str = "dns_redirect";
/// `dstnat` (-100, `NF_IP_PRI_NAT_DST`): where destination NAT belongs, after conntrack
/// (-200) has seen the packet. Both tables' chains sit here; NAT is decided once per
/// connection, by the first chain that sets a mapping, so the second never redirects again.
pub const DNS_PRIORITY: i32 = -100;
/// `NF_INET_PRE_ROUTING`: before the routing decision, so a query to any address, on the cell
/// (169.254.0.2) or beyond it (a VPC resolver, the internet), is redirected the same way.
pub const HOOK_PREROUTING: u32 = 0;
/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// `enum nft_payload_bases`: the transport header.
pub const PAYLOAD_TRANSPORT: u32 = 2;
/// IPPROTO_UDP.
pub const IPPROTO_UDP: u8 = 17;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect names a port.
pub const NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;

/// `NFT_TABLE_F_OWNER` (linux/netfilter/nf_tables.h).
pub const TABLE_F_OWNER: u32 = 0x2;
/// `NFT_SET_INTERVAL`.
pub const SET_F_INTERVAL: u32 = 0x4;
/// `NFT_SET_ELEM_INTERVAL_END`.
pub const ELEM_F_INTERVAL_END: u32 = 0x1;

/// One of the agent's two tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentTable {
    /// `inet egress_guard`: survives the agent (fail closed while it is down).
    Persistent,
    /// `inet egress_guard_owned`: owned by the agent's socket (tamper-proof while it runs).
    Owned,
}

impl AgentTable {
    pub const ALL: [AgentTable; 2] = [AgentTable::Persistent, AgentTable::Owned];

    pub fn name(self) -> &'static str {
        match self {
            AgentTable::Persistent => "egress_guard",
            AgentTable::Owned => "egress_guard_owned",
        }
    }

    /// Table flags the agent creates it with.
    pub fn flags(self) -> u32 {
        match self {
            AgentTable::Persistent => 0,
            AgentTable::Owned => TABLE_F_OWNER,
        }
    }

    pub fn from_name(name: &str) -> Option<AgentTable> {
        AgentTable::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// nf_tables registers (`enum nft_registers`): the verdict register, and the 32-bit registers
/// nft uses (reg 1 is the first 128-bit register, which nft calls "reg 1"; reg 9 the second
/// 32-bit slot of it, used for the second half of a concatenation).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG32_01: u32 = 9;

/// `enum nft_meta_keys` values the rules use.
pub const META_IIF: u32 = 4;
/// The kind of the input and output interface ("veth", "vxlan", …).
pub const META_IIFKIND: u32 = 26;
pub const META_OIFKIND: u32 = 27;
/// Interface kinds compare as IFNAMSIZ-byte strings, as nft pads them.
const IFNAMSIZ: usize = 16;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;
/// `enum nft_payload_bases`: the network header.
pub const PAYLOAD_NETWORK: u32 = 1;
/// `enum nft_cmp_ops`: equality.
pub const CMP_EQ: u32 = 0;
/// `NFT_OBJECT_COUNTER`.
pub const OBJECT_COUNTER: u32 = 1;
/// `enum nft_reject_types` and `enum nft_reject_inet_code`.
pub const REJECT_TCP_RST: u32 = 1;
pub const REJECT_ICMPX_UNREACH: u32 = 2;
pub const REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;
/// `NFPROTO_IPV4`, and IPPROTO_TCP.
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;
/// Netfilter verdict codes (`NF_ACCEPT`, and nf_tables' `NFT_JUMP`, `NFT_RETURN`).
pub const NF_ACCEPT: u32 = 1;
pub const NFT_JUMP: i32 = -3;
pub const NFT_RETURN: i32 = -5;
/// `NF_INET_FORWARD`.
pub const HOOK_FORWARD: u32 = 2;

/// nft's datatype numbers for set keys (nftables `enum datatypes`): `ipv4_addr` and
/// `iface_index`; a concatenation packs them 8 bits apart (`TYPE_BITS`).
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IP6ADDR: u32 = 8;
pub const TYPE_IFINDEX: u32 = 5;
pub const CONCAT_TYPE_BITS: u32 = 8;

/// Set userdata nft writes (libnftnl `NFTNL_UDATA_SET_*` TLVs), which `nft list` needs to
/// print elements in their types' notation:
/// - `ipv4_addr` key: key byte order big endian (type 0, len 4, value 2);
const USERDATA_IPV4_KEY: [u8; 6] = [0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
/// - `iface_index . ipv4_addr`: key byte order unset (0), then the key's "typeof" description
///   (type 3) that nft writes for a concatenation: expression type 13 (concat), no data.
const USERDATA_IFINDEX_IPV4_KEY: [u8; 16] = [
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00,
];

/// One nf_tables expression, as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta load <key> => reg <dreg>`
    Meta { key: u32, dreg: u32 },
    /// `payload load <len>b @ <base> header + <offset> => reg <dreg>`
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `bitwise reg <dreg> = (reg <sreg> & <mask>) ^ <xor>`
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `cmp <op> reg <sreg> <data>`
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `lookup reg <sreg> set <set>` (flags: `NFT_LOOKUP_F_INV` when inverted)
    Lookup { sreg: u32, set: String, flags: u32 },
    /// `immediate reg 0 <verdict>`: a jump or return.
    Verdict { code: i32, chain: Option<String> },
    /// `objref type 1 name <name>`: a named counter.
    CounterRef(String),
    /// `reject type <kind> code <code>`
    Reject { kind: u32, code: u8 },
    /// `limit rate <rate>/<unit> seconds burst <burst>` (`kind` 0: packets; `flags` 1:
    /// inverted, "rate over").
    Limit {
        rate: u64,
        unit: u64,
        burst: u32,
        kind: u32,
        flags: u32,
    },
    /// `log prefix <prefix> group <group>`: hand the packet to an NFLOG group.
    Log { group: u16, prefix: String },
    /// `immediate reg <dreg> <data>`: a value (not a verdict) loaded into a data register.
    Immediate { dreg: u32, data: Vec<u8> },
    /// `redir proto_min reg <sreg> flags <flags>`: NAT to the incoming interface's address,
    /// at the port in `sreg` (`redirect to :PORT`).
    Redirect { proto_min_reg: u32, flags: u32 },
}

/// A set element: its key bytes (in the kernel's register layout) and whether it ends an
/// interval.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub key: Vec<u8>,
    pub interval_end: bool,
}

/// A named set, as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: &'static str,
    pub key_type: u32,
    pub key_len: u32,
    pub flags: u32,
    pub userdata: Vec<u8>,
}

/// A base chain's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub kind: String,
    pub hooknum: u32,
    pub priority: i32,
    pub policy: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: String,
    pub hook: Option<Hook>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub chain: String,
    pub exprs: Vec<Expr>,
}

/// Everything in one table but the exempt set's elements, in creation order. Two tables
/// with equal shapes hold the same rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub flags: u32,
    /// Chains, sets and stateful objects in the table (the kernel's use count): reveals
    /// anything added that the agent does not read back by name.
    pub objects: u32,
    pub counters: Vec<String>,
    pub sets: Vec<SetShape>,
    pub chains: Vec<ChainSpec>,
    pub rules: Vec<RuleSpec>,
}

impl Shape {
    /// The first part of `self` that differs from `other`, in words (for logs: what drifted).
    pub fn first_difference(&self, other: &Shape) -> Option<String> {
        if self.flags != other.flags {
            return Some(format!(
                "table flags {:#x} vs {:#x}",
                self.flags, other.flags
            ));
        }
        if self.objects != other.objects {
            return Some(format!(
                "{} chains, sets and objects vs {}",
                self.objects, other.objects
            ));
        }
        if self.counters != other.counters {
            return Some(format!(
                "counters {:?} vs {:?}",
                self.counters, other.counters
            ));
        }
        if self.sets != other.sets {
            let set = self
                .sets
                .iter()
                .zip(&other.sets)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("set {}: {a:?} vs {b:?}", a.name));
            return Some(set.unwrap_or_else(|| "a set is missing or extra".into()));
        }
        if self.chains != other.chains {
            return Some(format!("chains {:?} vs {:?}", self.chains, other.chains));
        }
        if self.rules != other.rules {
            let rule = self
                .rules
                .iter()
                .zip(&other.rules)
                .position(|(a, b)| a != b)
                .map(|i| format!("rule {i}: {:?} vs {:?}", self.rules[i], other.rules[i]));
            return Some(rule.unwrap_or_else(|| {
                format!("{} rules vs {}", self.rules.len(), other.rules.len())
            }));
        }
        None
    }
}

/// A set as compared: its type and, for the `allowed` set, its elements (they come from the
/// configuration, so they are structure, not churn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetShape {
    pub name: String,
    pub key_type: u32,
    pub key_len: u32,
    pub flags: u32,
    pub elements: Option<BTreeSet<Element>>,
}

/// The sets of a table, in creation order.
pub fn sets() -> [SetSpec; 4] {
    [
        SetSpec {
            name: ALLOWED_SET,
            key_type: TYPE_IPADDR,
            key_len: 4,
            flags: SET_F_INTERVAL,
            userdata: USERDATA_IPV4_KEY.to_vec(),
        },
        SetSpec {
            name: EXEMPT_SET,
            key_type: (TYPE_IFINDEX << CONCAT_TYPE_BITS) | TYPE_IPADDR,
            key_len: 8,
            flags: 0,
            userdata: USERDATA_IFINDEX_IPV4_KEY.to_vec(),
        },
        // nft writes the same userdata for the IPv6 key types as for the IPv4 ones.
        SetSpec {
            name: ALLOWED6_SET,
            key_type: TYPE_IP6ADDR,
            key_len: 16,
            flags: SET_F_INTERVAL,
            userdata: USERDATA_IPV4_KEY.to_vec(),
        },
        SetSpec {
            name: EXEMPT6_SET,
            key_type: (TYPE_IFINDEX << CONCAT_TYPE_BITS) | TYPE_IP6ADDR,
            key_len: 20,
            flags: 0,
            userdata: USERDATA_IFINDEX_IPV4_KEY.to_vec(),
        },
    ]
}

/// The names of [`chains`], for reading them back one by one.
/// The DNS chain is asked for whether or not DNS is enabled: absent, it lists nothing; present
/// when it should not be, it is a difference like any other.
pub fn chain_names() -> [&'static str; 4] {
    [FORWARD_CHAIN, EGRESS_CHAIN, EGRESS6_CHAIN, DNS_CHAIN]
}

/// The chains of a table, in creation order.
pub fn chains() -> [ChainSpec; 3] {
    [
        ChainSpec {
            name: FORWARD_CHAIN.into(),
            hook: Some(Hook {
                kind: "filter".into(),
                hooknum: HOOK_FORWARD,
                priority: FORWARD_PRIORITY,
                policy: NF_ACCEPT,
            }),
        },
        ChainSpec {
            name: EGRESS_CHAIN.into(),
            hook: None,
        },
        ChainSpec {
            name: EGRESS6_CHAIN.into(),
            hook: None,
        },
    ]
}

/// The named counters of a table, in creation order.
pub fn counters() -> [&'static str; 6] {
    [
        COUNTER_TCP,
        COUNTER_OTHER,
        COUNTER_BLOCKED,
        COUNTER_LOGGED,
        COUNTER6_TCP,
        COUNTER6_OTHER,
    ]
}

/// The rules of `table`, in order, for `mode`.
pub fn rules(table: AgentTable, overlay: Ipv4Net, mode: Mode) -> Vec<RuleSpec> {
    let rule = |chain: &str, exprs: Vec<Expr>| RuleSpec {
        chain: chain.into(),
        exprs,
    };
    let mut jump = ipv4_only();
    jump.extend(match_prefix(IPV4_SADDR_OFFSET, overlay));
    jump.push(Expr::Verdict {
        code: NFT_JUMP,
        chain: Some(EGRESS_CHAIN.into()),
    });

    let exempt = exempt_return(NFPROTO_IPV4, IPV4_SADDR_OFFSET, 4, EXEMPT_SET);

    let mut allowed = ipv4_only();
    allowed.extend([
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset: IPV4_DADDR_OFFSET,
            len: 4,
            dreg: REG_1,
        },
        lookup(ALLOWED_SET),
        return_(),
    ]);

    let mut rules = vec![
        rule(FORWARD_CHAIN, jump),
        rule(EGRESS_CHAIN, exempt),
        rule(EGRESS_CHAIN, allowed),
    ];
    rules.extend(
        reject_or_log(table, mode)
            .into_iter()
            .map(|exprs| rule(EGRESS_CHAIN, exprs)),
    );
    rules.extend(ipv6_rules(table, mode));
    rules
}

/// IPv6: there is no overlay to match on (silk takes containers' IPv6 addresses from the
/// cell's own prefix, whatever it is), so the rule matches a property of container traffic the
/// kernel knows without the agent: it entered the cell from a veth, the host end of every
/// container's link (silk's `s-…` and the CNI `ptp` plugin's `veth…` alike). Traffic that
/// leaves through another veth is container-to-container on this cell and stays allowed.
fn ipv6_rules(table: AgentTable, mode: Mode) -> Vec<RuleSpec> {
    let rule = |chain: &str, exprs: Vec<Expr>| RuleSpec {
        chain: chain.into(),
        exprs,
    };
    let mut jump = nfproto(NFPROTO_IPV6);
    jump.extend(interface_kind(META_IIFKIND, "veth"));
    jump.push(Expr::Verdict {
        code: NFT_JUMP,
        chain: Some(EGRESS6_CHAIN.into()),
    });

    let exempt = exempt_return(NFPROTO_IPV6, IPV6_SADDR_OFFSET, 16, EXEMPT6_SET);

    let mut allowed = nfproto(NFPROTO_IPV6);
    allowed.extend([
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset: IPV6_DADDR_OFFSET,
            len: 16,
            dreg: REG_1,
        },
        lookup(ALLOWED6_SET),
        return_(),
    ]);

    let mut container_to_container = interface_kind(META_OIFKIND, "veth");
    container_to_container.push(return_());

    let mut rules = vec![
        rule(FORWARD_CHAIN, jump),
        rule(EGRESS6_CHAIN, exempt),
        rule(EGRESS6_CHAIN, allowed),
        rule(EGRESS6_CHAIN, container_to_container),
    ];
    rules.extend(
        reject_or_log_counting(table, mode, COUNTER6_TCP, COUNTER6_OTHER)
            .into_iter()
            .map(|exprs| rule(EGRESS6_CHAIN, exprs)),
    );
    rules
}

/// `meta iifkind "veth"` (or oifkind): the kind, NUL-padded to IFNAMSIZ.
fn interface_kind(key: u32, kind: &str) -> Vec<Expr> {
    let mut data = kind.as_bytes().to_vec();
    data.resize(IFNAMSIZ, 0);
    vec![
        Expr::Meta { key, dreg: REG_1 },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data,
        },
    ]
}

/// The end of `overlay_egress`: what happens to a packet from a restricted container to a
/// destination outside `allowed`. In both modes it is counted and, within the rate limit,
/// handed to NFLOG ([`report`]); enforce then rejects it. Audit adds no verdict: the packet
/// falls off the end of the chain, returns to `forward`, whose policy accepts it, and goes on
/// to the next base chain on the hook (the other table, then the iptables filter table at
/// priority 0) exactly as if egress-guard were not there. An `accept` verdict would do the
/// same in nf_tables (it is final only for the base chain that issues it), but falling off the
/// end says "no opinion" without relying on that.
pub fn reject_or_log(table: AgentTable, mode: Mode) -> Vec<Vec<Expr>> {
    reject_or_log_counting(table, mode, COUNTER_TCP, COUNTER_OTHER)
}

/// [`reject_or_log`] with the reject rules counting into `tcp_counter` and `other_counter`
/// (IPv4 and IPv6 count apart; both report to the same NFLOG group).
fn reject_or_log_counting(
    table: AgentTable,
    mode: Mode,
    tcp_counter: &str,
    other_counter: &str,
) -> Vec<Vec<Expr>> {
    let mut rules = vec![report(table)];
    if mode == Mode::Enforce {
        rules.push(vec![
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: vec![IPPROTO_TCP],
            },
            Expr::CounterRef(tcp_counter.into()),
            Expr::Reject {
                kind: REJECT_TCP_RST,
                code: 0,
            },
        ]);
        rules.push(vec![
            Expr::CounterRef(other_counter.into()),
            Expr::Reject {
                kind: REJECT_ICMPX_UNREACH,
                code: REJECT_ICMPX_ADMIN_PROHIBITED,
            },
        ]);
    }
    rules
}

/// `counter name "blocked" limit rate 200/second burst 100 packets counter name
/// "blocked_logged" log prefix "<table>" group 9851`: count every match, then hand at most
/// the limit's share to NFLOG. The prefix names the table, because in audit mode a packet
/// passes both tables and is logged by each: the agent keeps one table's reports.
pub fn report(table: AgentTable) -> Vec<Expr> {
    vec![
        Expr::CounterRef(COUNTER_BLOCKED.into()),
        Expr::Limit {
            rate: LOG_RATE_PER_SECOND,
            unit: 1,
            burst: LOG_BURST,
            kind: LIMIT_PKTS,
            flags: 0,
        },
        Expr::CounterRef(COUNTER_LOGGED.into()),
        Expr::Log {
            group: NFLOG_GROUP,
            prefix: table.name().into(),
        },
    ]
}

/// The DNS filter's chain, in creation order (after [`chains`]), present when `[dns]` is
/// enabled.
pub fn dns_chains() -> [ChainSpec; 1] {
    [ChainSpec {
        name: DNS_CHAIN.into(),
        hook: Some(Hook {
            kind: "nat".into(),
            hooknum: HOOK_PREROUTING,
            priority: DNS_PRIORITY,
            policy: NF_ACCEPT,
        }),
    }]
}

/// The DNS filter's rules (after [`rules`]): exempt (staging) containers keep their DNS as it
/// is; every other overlay source's UDP and TCP queries to port 53, whatever the address, go
/// to `port` on the address of the interface they came in on (the container's host veth):
///
/// ```text
/// iif . ip saddr @exempt return
/// ip saddr <overlay> udp dport 53 redirect to :<port>
/// ip saddr <overlay> tcp dport 53 redirect to :<port>
/// ```
///
/// `redirect` rather than `dnat to 127.0.0.1`: a forwarded packet to 127.0.0.0/8 is a martian
/// unless `route_localnet` is set on every container interface; the interface's own address
/// needs nothing. Redirected queries are local (INPUT hook), so the forward chain's reject
/// never sees them, and conntrack gives the reply the address the container asked.
pub fn dns_rules(overlay: Ipv4Net, port: u16) -> Vec<RuleSpec> {
    let exempt = exempt_return(NFPROTO_IPV4, IPV4_SADDR_OFFSET, 4, EXEMPT_SET);
    let redirect = |l4proto: u8| {
        let mut exprs = ipv4_only();
        exprs.extend(match_prefix(IPV4_SADDR_OFFSET, overlay));
        exprs.extend([
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: vec![l4proto],
            },
            Expr::Payload {
                base: PAYLOAD_TRANSPORT,
                offset: 2,
                len: 2,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: DNS_PORT.to_be_bytes().to_vec(),
            },
            Expr::Immediate {
                dreg: REG_1,
                data: port.to_be_bytes().to_vec(),
            },
            Expr::Redirect {
                proto_min_reg: REG_1,
                flags: NAT_RANGE_PROTO_SPECIFIED,
            },
        ]);
        RuleSpec {
            chain: DNS_CHAIN.into(),
            exprs,
        }
    };
    vec![
        RuleSpec {
            chain: DNS_CHAIN.into(),
            exprs: exempt,
        },
        redirect(IPPROTO_UDP),
        redirect(IPPROTO_TCP),
    ]
}

const IPV4_SADDR_OFFSET: u32 = 12;
const IPV4_DADDR_OFFSET: u32 = 16;
const IPV6_SADDR_OFFSET: u32 = 8;
const IPV6_DADDR_OFFSET: u32 = 24;

/// The dependency nft adds in an `inet` table before matching an IPv4 header field.
fn ipv4_only() -> Vec<Expr> {
    nfproto(NFPROTO_IPV4)
}

/// `iif . ip saddr @<set> return` (or `ip6`): an exempt container's own packets leave the
/// chain. The interface index and the source address are concatenated in registers 1 and 9.
fn exempt_return(family: u8, saddr_offset: u32, len: u32, set: &str) -> Vec<Expr> {
    let mut exprs = nfproto(family);
    exprs.extend([
        Expr::Meta {
            key: META_IIF,
            dreg: REG_1,
        },
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset: saddr_offset,
            len,
            dreg: REG32_01,
        },
        lookup(set),
        return_(),
    ]);
    exprs
}

/// `meta nfproto <family>`.
fn nfproto(family: u8) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: vec![family],
        },
    ]
}

fn lookup(set: &str) -> Expr {
    Expr::Lookup {
        sreg: REG_1,
        set: set.into(),
        flags: 0,
    }
}

fn return_() -> Expr {
    Expr::Verdict {
        code: NFT_RETURN,
        chain: None,
    }
}

/// `ip saddr <net>` as nft compiles it: a byte-aligned prefix loads just its bytes; any other
/// prefix loads the whole address and masks it.
fn match_prefix(offset: u32, net: Ipv4Net) -> Vec<Expr> {
    let len = net.prefix_len();
    let address = net.network().octets();
    if len > 0 && len.is_multiple_of(8) {
        let bytes = usize::from(len / 8);
        return vec![
            Expr::Payload {
                base: PAYLOAD_NETWORK,
                offset,
                len: u32::from(len / 8),
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: CMP_EQ,
                data: address[..bytes].to_vec(),
            },
        ];
    }
    vec![
        Expr::Payload {
            base: PAYLOAD_NETWORK,
            offset,
            len: 4,
            dreg: REG_1,
        },
        Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            mask: net.netmask().octets().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: address.to_vec(),
        },
    ]
}

/// The `allowed` set's elements for `networks` (sorted, aggregated), as nft writes an interval
/// set: each range as its start and, unless it runs to the top of the address space, an
/// end-of-interval element at the first address after it (ranges that touch keep both their
/// end and the next start, as nft sends them; overlapping ones merge); and an end-of-interval
/// element at 0.0.0.0 when no range starts there.
pub fn interval_elements(networks: &[Ipv4Net]) -> Vec<Element> {
    let ranges = networks.iter().map(|n| {
        (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        )
    });
    intervals(ranges, 4)
}

/// [`interval_elements`] for an IPv6 interval set.
pub fn interval_elements6(networks: &[Ipv6Net]) -> Vec<Element> {
    let ranges = networks
        .iter()
        .map(|n| (u128::from(n.network()), u128::from(n.broadcast())));
    intervals(ranges, 16)
}

/// Interval set elements for (first, last) address ranges of `width`-byte addresses.
fn intervals(ranges: impl Iterator<Item = (u128, u128)>, width: usize) -> Vec<Element> {
    let key = |value: u128| value.to_be_bytes()[16 - width..].to_vec();
    let mut sorted: Vec<(u128, u128)> = ranges.collect();
    sorted.sort();
    // (start, last) with overlapping ranges merged; touching ones kept apart, as nft does.
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (start, last) in sorted {
        match merged.last_mut() {
            Some((_, previous_last)) if start <= *previous_last => {
                *previous_last = (*previous_last).max(last);
            }
            _ => merged.push((start, last)),
        }
    }
    let top = if width == 16 {
        u128::MAX
    } else {
        (1u128 << (width * 8)) - 1
    };
    let mut elements = Vec::with_capacity(merged.len() * 2 + 1);
    if merged.first().is_some_and(|(start, _)| *start != 0) {
        elements.push(Element {
            key: vec![0; width],
            interval_end: true,
        });
    }
    for (start, last) in merged {
        elements.push(Element {
            key: key(start),
            interval_end: false,
        });
        if last < top {
            elements.push(Element {
                key: key(last + 1),
                interval_end: true,
            });
        }
    }
    elements
}

/// An exempt set element: the interface index in host byte order (nft's `iface_index`), then
/// the address, each in a 4-byte register slot.
pub fn exempt_element(key: &ExemptKey) -> Element {
    let mut bytes = key.ifindex.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&key.ip.octets());
    Element {
        key: bytes,
        interval_end: false,
    }
}

/// An IPv6 exempt set element: interface index (host order), then the 16-byte address.
pub fn exempt6_element(key: &Exempt6Key) -> Element {
    let mut bytes = key.ifindex.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&key.ip.octets());
    Element {
        key: bytes,
        interval_end: false,
    }
}

/// The inverse of [`exempt6_element`].
pub fn exempt6_key(element: &Element) -> Option<Exempt6Key> {
    let (index, address) = element.key.split_first_chunk::<4>()?;
    let address: [u8; 16] = address.try_into().ok()?;
    Some(Exempt6Key {
        ifindex: u32::from_ne_bytes(*index),
        ip: Ipv6Addr::from(address),
    })
}

/// The inverse of [`exempt_element`].
pub fn exempt_key(element: &Element) -> Option<ExemptKey> {
    let key: [u8; 8] = element.key.as_slice().try_into().ok()?;
    let ifindex = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]);
    let ip = Ipv4Addr::new(key[4], key[5], key[6], key[7]);
    Some(ExemptKey { ifindex, ip })
}

/// The shape a table must have for `rules`.
pub fn shape(table: AgentTable, rules_: &DesiredRules) -> Shape {
    let allowed: BTreeSet<Element> = interval_elements(&rules_.allowed).into_iter().collect();
    let allowed6: BTreeSet<Element> = interval_elements6(&rules_.allowed6).into_iter().collect();
    let sets = sets();
    let counters = counters();
    let mut chains_ = chains().to_vec();
    let mut rules = rules(table, rules_.overlay, rules_.mode);
    if let Some(port) = rules_.dns_redirect {
        chains_.extend(dns_chains());
        rules.extend(dns_rules(rules_.overlay, port));
    }
    Shape {
        flags: table.flags(),
        objects: (chains_.len() + sets.len() + counters.len()) as u32,
        counters: counters.iter().map(|c| c.to_string()).collect(),
        sets: sets
            .into_iter()
            .map(|s| SetShape {
                name: s.name.into(),
                key_type: s.key_type,
                key_len: s.key_len,
                flags: s.flags,
                elements: match s.name {
                    ALLOWED_SET => Some(allowed.clone()),
                    ALLOWED6_SET => Some(allowed6.clone()),
                    _ => None,
                },
            })
            .collect(),
        chains: chains_,
        rules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|n| n.parse().expect("literal")).collect()
    }

    fn keys(elements: &[Element]) -> Vec<(String, bool)> {
        elements
            .iter()
            .map(|e| (hex(&e.key), e.interval_end))
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn intervals_are_written_as_nft_writes_them() {
        // What nft 1.0.6 sent for `elements = { 10.0.0.0/8, 172.16.5.0/24 }`.
        let elements = interval_elements(&nets(&["172.16.5.0/24", "10.0.0.0/8"]));
        assert_eq!(
            keys(&elements),
            vec![
                ("00000000".into(), true),
                ("0a000000".into(), false),
                ("0b000000".into(), true),
                ("ac100500".into(), false),
                ("ac100600".into(), true),
            ]
        );
    }

    #[test]
    fn touching_ranges_keep_their_bounds_and_the_top_has_no_end() {
        // nft sent 0.0.0.0 end, 11.0.0.0, 12.0.0.0 end, 12.0.0.0, 13.0.0.0 end for
        // `{ 11.0.0.0/8, 12.0.0.0/8 }`.
        let elements = interval_elements(&nets(&["11.0.0.0/8", "12.0.0.0/8", "128.0.0.0/1"]));
        assert_eq!(
            keys(&elements),
            vec![
                ("00000000".into(), true),
                ("0b000000".into(), false),
                ("0c000000".into(), true),
                ("0c000000".into(), false),
                ("0d000000".into(), true),
                ("80000000".into(), false),
            ]
        );
        let from_zero = interval_elements(&nets(&["0.0.0.0/8"]));
        assert_eq!(
            keys(&from_zero),
            vec![("00000000".into(), false), ("01000000".into(), true)]
        );
    }

    #[test]
    fn prefixes_compile_as_nft_compiles_them() {
        // Byte aligned: load only the prefix's bytes.
        let aligned = match_prefix(12, "10.255.0.0/16".parse().expect("literal"));
        assert_eq!(
            aligned,
            vec![
                Expr::Payload {
                    base: 1,
                    offset: 12,
                    len: 2,
                    dreg: 1
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: vec![10, 255]
                },
            ]
        );
        // Not aligned: the whole address, masked.
        let masked = match_prefix(12, "10.240.0.0/12".parse().expect("literal"));
        assert_eq!(
            masked[1],
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: vec![255, 240, 0, 0],
                xor: vec![0; 4]
            }
        );
        // A host: the whole address, no mask.
        let host = match_prefix(12, "10.255.1.1/32".parse().expect("literal"));
        assert_eq!(host.len(), 2);
    }

    #[test]
    fn exempt_elements_round_trip() {
        let key = ExemptKey {
            ifindex: 12,
            ip: Ipv4Addr::new(10, 255, 1, 4),
        };
        let element = exempt_element(&key);
        assert_eq!(element.key.len(), 8);
        assert_eq!(exempt_key(&element), Some(key));
        assert_eq!(
            exempt_key(&Element {
                key: vec![1, 2, 3],
                interval_end: false
            }),
            None
        );
    }

    #[test]
    fn chain_names_name_every_chain() {
        let mut names: Vec<String> = chains().iter().map(|c| c.name.clone()).collect();
        names.extend(dns_chains().iter().map(|c| c.name.clone()));
        assert_eq!(names, chain_names().map(String::from).to_vec());
    }

    #[test]
    fn tables_differ_only_in_name_flags_and_log_prefix() {
        let rules_ = DesiredRules {
            allowed6: Vec::new(),
            exempt6: Default::default(),
            overlay: "10.255.0.0/16".parse().expect("literal"),
            allowed: nets(&["10.0.0.0/8"]),
            exempt: BTreeSet::new(),
            mode: Mode::Enforce,
            dns_redirect: None,
        };
        let persistent = shape(AgentTable::Persistent, &rules_);
        let mut owned = shape(AgentTable::Owned, &rules_);
        assert_eq!(owned.flags, TABLE_F_OWNER);
        owned.flags = 0;
        for rule in &mut owned.rules {
            for expr in &mut rule.exprs {
                if let Expr::Log { prefix, .. } = expr {
                    assert_eq!(prefix, "egress_guard_owned");
                    *prefix = "egress_guard".into();
                }
            }
        }
        assert_eq!(persistent, owned);
        assert_eq!(
            AgentTable::from_name("egress_guard_owned"),
            Some(AgentTable::Owned)
        );
        assert_eq!(AgentTable::from_name("filter"), None);
    }

    #[test]
    fn audit_reports_what_enforce_rejects_and_adds_no_verdict() {
        let overlay = "10.255.0.0/16".parse().expect("literal");
        let enforce = rules(AgentTable::Persistent, overlay, Mode::Enforce);
        let audit = rules(AgentTable::Persistent, overlay, Mode::Audit);
        // The same classification, chain by chain: audit's rules are enforce's up to and
        // including the report rule, which ends each egress chain in audit.
        for chain in [EGRESS_CHAIN, EGRESS6_CHAIN, FORWARD_CHAIN] {
            let of = |rs: &[RuleSpec]| -> Vec<RuleSpec> {
                rs.iter().filter(|r| r.chain == chain).cloned().collect()
            };
            let (audit_chain, enforce_chain) = (of(&audit), of(&enforce));
            assert_eq!(
                audit_chain.as_slice(),
                &enforce_chain[..audit_chain.len()],
                "{chain}"
            );
            if chain != FORWARD_CHAIN {
                assert_eq!(
                    audit_chain.last().map(|r| &r.exprs),
                    Some(&report(AgentTable::Persistent)),
                    "{chain}"
                );
            }
        }
        // Enforce rejects after the report (IPv4 and IPv6); audit never rejects.
        let rejects = |rs: &[RuleSpec]| {
            rs.iter()
                .flat_map(|r| &r.exprs)
                .filter(|e| matches!(e, Expr::Reject { .. }))
                .count()
        };
        assert_eq!(rejects(&enforce), 4);
        assert_eq!(rejects(&audit), 0);
        // The limit comes between the two counters, the log after it.
        let report = report(AgentTable::Owned);
        assert!(matches!(&report[0], Expr::CounterRef(c) if c == COUNTER_BLOCKED));
        assert!(matches!(
            report[1],
            Expr::Limit {
                rate: LOG_RATE_PER_SECOND,
                ..
            }
        ));
        assert!(matches!(&report[2], Expr::CounterRef(c) if c == COUNTER_LOGGED));
        assert!(
            matches!(&report[3], Expr::Log { group: NFLOG_GROUP, prefix } if prefix == "egress_guard_owned")
        );
    }
}
