//! The typed description of tables: expressions, set elements, sets, chains, rules, and a
//! table's shape (everything but its set elements).

use std::collections::BTreeSet;

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
    /// `bitwise reg <dreg> = (reg <sreg> & <mask>) ^ <xor>`. `explicit_op`: nft names the
    /// (boolean) operation for an `&` written in a rule, not for a prefix match; the kernel
    /// treats both alike and lists the operation for both, so comparisons ignore it
    /// ([`crate::dataplane::netlink::dump::normalise`]).
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
        explicit_op: bool,
    },
    /// `cmp <op> reg <sreg> <data>`
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `lookup reg <sreg> set <set>` (flags: `NFT_LOOKUP_F_INV` when inverted)
    Lookup { sreg: u32, set: String, flags: u32 },
    /// `lookup reg <sreg> set <set> dreg 0`: `vmap @set`, the verdict the element for the key
    /// holds (no element: the rule ends).
    VerdictMap { sreg: u32, set: String },
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
    /// `ct load <key> => reg <dreg>`: the packet's connection's state or mark.
    Ct { key: u32, dreg: u32 },
    /// `ct set <key> with reg <sreg>`: sets the connection's mark.
    CtSet { key: u32, sreg: u32 },
    /// `immediate reg <dreg> <data>`: a value (not a verdict) loaded into a data register.
    Immediate { dreg: u32, data: Vec<u8> },
    /// `redir proto_min reg <sreg> flags <flags>`: NAT to the incoming interface's address,
    /// at the port in `sreg` (`redirect to :PORT`).
    Redirect { proto_min_reg: u32, flags: u32 },
    /// `dynset update reg_key <sreg_key> set <set> expr <limit>`: `update @set { key limit
    /// … }`, a per-element limit in a dynamic set (a meter): the element for the key in
    /// `sreg_key` is added if missing, then its own copy of `limit` decides. When the set is
    /// full and the key is new, the rule stops here (the packet goes on to the next rule).
    Dynset {
        sreg_key: u32,
        set: String,
        limit: Box<Expr>,
    },
}

/// A set element: its key bytes (in the kernel's register layout) and whether it ends an
/// interval.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub key: Vec<u8>,
    pub interval_end: bool,
    /// A verdict map element's value: `jump <chain>`.
    pub jump: Option<String>,
}

/// A named set, as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: &'static str,
    pub key_type: u32,
    pub key_len: u32,
    pub flags: u32,
    pub userdata: Vec<u8>,
    /// A dynamic set's bounds: at most `size` elements, each expiring `timeout_ms` after
    /// its last update. None for the sets the agent fills itself.
    pub bounds: Option<SetBounds>,
    /// A map whose values are verdicts (`type … : verdict`).
    pub verdict_map: bool,
}

/// The size and element timeout of a dynamic set (a meter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetBounds {
    pub size: u32,
    pub timeout_ms: u64,
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
    pub bounds: Option<SetBounds>,
    pub verdict_map: bool,
    pub elements: Option<BTreeSet<Element>>,
}
