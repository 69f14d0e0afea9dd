//! Reading the kernel's state back: dump requests, and their replies -> what each of the
//! agent's tables holds (pure).
//!
//! Replies are parsed with `netlink-packet-netfilter` and projected onto the same typed
//! [`Shape`] the desired rules produce, so drift is a structural comparison. Handles, use
//! counts and other informational attributes are ignored; anything the agent would not have
//! written (another chain, rule, set or object in its table) shows as a difference.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, Nla, NlasIterator, Parseable,
};
use netlink_packet_netfilter::nftables::Bitwise;
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    Immediate, ListAttribute, Lookup, Meta, NfTablesMessage, Payload, RuleAttribute, RuleMessage,
    SetAttribute, SetDescription, SetElementAttribute, SetElementList, SetElementMessage,
    SetMessage, TableAttribute, TableMessage, VerdictAttribute,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use super::batch::append;
use crate::dataplane::model::{
    self, AgentTable, ChainSpec, Element, Expr, Hook as ChainHook, RuleSpec, SetBounds, SetShape,
    Shape,
};
use crate::dataplane::observe::{BlockedCounters, ObservedTable, RejectCounters};
use crate::policy::ScopeElements;
use crate::wire;

/// What a dump asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpKind {
    /// Every inet table (a cell has few).
    Tables,
    /// One chain by name (not a dump: the kernel cannot list one table's chains alone, and a
    /// cell's iptables-nft tables hold thousands). The table's use count reveals any other.
    Chain(AgentTable, String),
    Sets(AgentTable),
    Objects(AgentTable),
    Rules(AgentTable),
    Elements(AgentTable, &'static str),
}

impl DumpKind {
    /// A dump (many answers, ended by NLMSG_DONE) rather than a get (one answer).
    pub fn is_dump(&self) -> bool {
        !matches!(self, DumpKind::Chain(..))
    }
}

/// A dump (or get) request for `kind` with sequence number `seq`.
pub fn request(kind: DumpKind, seq: u32) -> Vec<u8> {
    let message = match kind {
        DumpKind::Tables => NfTablesMessage::GetTable(TableMessage { attributes: vec![] }),
        DumpKind::Chain(table, ref name) => NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(table.name().into()),
                ChainAttribute::Name(name.clone()),
            ],
        }),
        DumpKind::Sets(table) => NfTablesMessage::GetSet(SetMessage {
            attributes: vec![SetAttribute::Table(table.name().into())],
        }),
        DumpKind::Objects(table) => NfTablesMessage::GetObject(vec![
            DefaultNla::new(1, format!("{}\0", table.name()).into_bytes()),
            DefaultNla::new(3, model::OBJECT_COUNTER.to_be_bytes().to_vec()),
        ]),
        DumpKind::Rules(table) => NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(table.name().into())],
        }),
        DumpKind::Elements(table, set) => NfTablesMessage::GetSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table(table.name().into()),
                SetElementList::Set(set.into()),
            ],
        }),
    };
    let mut out = Vec::new();
    append(
        &mut out,
        NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            message,
        ),
        if kind.is_dump() {
            NLM_F_REQUEST | NLM_F_DUMP
        } else {
            NLM_F_REQUEST | NLM_F_ACK
        },
        seq,
    );
    out
}

/// Accumulates dump replies for the agent's tables.
#[derive(Debug, Default)]
pub struct Listing {
    tables: BTreeMap<AgentTable, TableState>,
}

#[derive(Debug, Default)]
struct TableState {
    flags: u32,
    use_count: u32,
    owner: Option<u32>,
    counters: Vec<String>,
    rejected: RejectCounters,
    blocked: BlockedCounters,
    sets: Vec<SetShape>,
    chains: Vec<ChainSpec>,
    rules: Vec<RuleSpec>,
    exempt: BTreeSet<Element>,
    allowed: BTreeSet<Element>,
    exempt6: BTreeSet<Element>,
    allowed6: BTreeSet<Element>,
    containers6: BTreeSet<Element>,
    /// The scope maps' elements as read (chain names interned: thousands of containers share
    /// a few dozen orgs and spaces), and whether one did not decode.
    scopes: ScopeElements,
    scope_ids: std::collections::HashMap<String, Arc<str>>,
    scopes_unreadable: bool,
    /// Something in the table could not be decoded: never trust it as matching.
    undecodable: Vec<String>,
}

impl Listing {
    /// The agent's tables the replies named (dumps of other tables are skipped).
    pub fn tables(&self) -> impl Iterator<Item = AgentTable> + '_ {
        self.tables.keys().copied()
    }

    /// Takes one reply message of a dump.
    pub fn add(&mut self, message: &NfTablesMessage) {
        match message {
            NfTablesMessage::NewTable(TableMessage { attributes }) => {
                let mut name = None;
                let mut flags = 0;
                let mut owner = None;
                let mut use_count = 0;
                for attribute in attributes {
                    match attribute {
                        TableAttribute::Name(n) => name = AgentTable::from_name(n),
                        TableAttribute::Use(u) => use_count = *u,
                        TableAttribute::Flags(f) => flags = f.bits(),
                        TableAttribute::Owner(o) => owner = Some(*o),
                        _ => {}
                    }
                }
                if let Some(table) = name {
                    let state = self.tables.entry(table).or_default();
                    state.flags = flags;
                    state.owner = owner;
                    state.use_count = use_count;
                }
            }
            NfTablesMessage::NewObject(attributes) => self.add_object(attributes),
            NfTablesMessage::NewSet(SetMessage { attributes }) => self.add_set(attributes),
            NfTablesMessage::NewSetElement(SetElementMessage { attributes }) => {
                self.add_elements(attributes)
            }
            NfTablesMessage::NewChain(ChainMessage { attributes }) => self.add_chain(attributes),
            NfTablesMessage::NewRule(RuleMessage { attributes }) => self.add_rule(attributes),
            _ => {}
        }
    }

    fn state(&mut self, table: Option<&String>) -> Option<&mut TableState> {
        let table = AgentTable::from_name(table?)?;
        // Only tables the table dump listed: a late object of a deleted table is ignored.
        self.tables.get_mut(&table)
    }

    fn add_object(&mut self, attributes: &[DefaultNla]) {
        let Object {
            table,
            name,
            kind,
            counter,
        } = Object::parse(attributes);
        let Some(state) = self.state(table.as_ref()) else {
            return;
        };
        let Some(name) = name else { return };
        if kind != Some(model::OBJECT_COUNTER) {
            state
                .undecodable
                .push(format!("object {name} of type {kind:?}"));
            return;
        }
        let (bytes, packets) = counter;
        Self::record_counter(state, &name, bytes, packets);
    }

    fn record_counter(state: &mut TableState, name: &str, bytes: u64, packets: u64) {
        match name {
            model::COUNTER_TCP => {
                state.rejected.tcp_packets = packets;
                state.rejected.tcp_bytes = bytes;
            }
            model::COUNTER_OTHER => {
                state.rejected.other_packets = packets;
                state.rejected.other_bytes = bytes;
            }
            model::COUNTER6_TCP => {
                state.rejected.tcp6_packets = packets;
                state.rejected.tcp6_bytes = bytes;
            }
            model::COUNTER6_OTHER => {
                state.rejected.other6_packets = packets;
                state.rejected.other6_bytes = bytes;
            }
            model::COUNTER_DNS_RATE_LIMITED => state.rejected.dns_rate_limited = packets,
            model::COUNTER_DNS6_DROPPED => state.rejected.dns6_dropped = packets,
            model::COUNTER_BLOCKED => state.blocked.blocked = packets,
            model::COUNTER_LOGGED => state.blocked.logged = packets,
            _ => {}
        }
        state.counters.push(name.to_string());
    }

    fn add_set(&mut self, attributes: &[SetAttribute]) {
        let mut table = None;
        let mut shape = SetShape {
            name: String::new(),
            key_type: 0,
            key_len: 0,
            flags: 0,
            bounds: None,
            verdict_map: false,
            elements: None,
        };
        let (mut size, mut timeout_ms) = (None, None);
        for attribute in attributes {
            match attribute {
                SetAttribute::Table(t) => table = Some(t.clone()),
                SetAttribute::Name(n) => shape.name = n.clone(),
                SetAttribute::Flags(f) => shape.flags = f.bits(),
                SetAttribute::KeyType(k) => shape.key_type = *k,
                SetAttribute::KeyLen(l) => shape.key_len = *l,
                SetAttribute::Description(parts) => {
                    for part in parts {
                        if let SetDescription::Size(n) = part {
                            size = Some(*n);
                        }
                    }
                }
                SetAttribute::Timeout(ms) => timeout_ms = Some(*ms),
                // A verdict map (the kernel lists its data length as a verdict's size, 16).
                SetAttribute::DataType(model::DATA_VERDICT) => shape.verdict_map = true,
                SetAttribute::DataLen(_) => {}
                // Another map or set-wide per-element expressions: not a set the agent makes.
                SetAttribute::DataType(_)
                | SetAttribute::Expression(_)
                | SetAttribute::ListExpressions(_) => shape.flags |= 1 << 31,
                _ => {}
            }
        }
        // A size alone (the kernel lists one for every set nft sized) is no bound of ours; a
        // timeout without a size is not a set the agent makes either, and differs from any.
        // A timeout-flagged set with a size and no default timeout: a learned map, whose
        // elements each carry their own.
        shape.bounds = match (size, timeout_ms) {
            (Some(size), None) if shape.flags & model::SET_F_TIMEOUT != 0 => Some(SetBounds {
                size,
                timeout_ms: 0,
            }),
            (_, None) => None,
            (size, Some(timeout_ms)) => Some(SetBounds {
                size: size.unwrap_or(0),
                timeout_ms,
            }),
        };
        if let Some(state) = self.state(table.as_ref()) {
            state.sets.push(shape);
        }
    }

    fn add_elements(&mut self, attributes: &[SetElementList]) {
        let mut table = None;
        let mut set = None;
        let mut elements = Vec::new();
        let mut undecodable = 0usize;
        for attribute in attributes {
            match attribute {
                SetElementList::Table(t) => table = Some(t.clone()),
                SetElementList::Set(s) => set = Some(s.clone()),
                SetElementList::Elements(list) => {
                    for item in list {
                        match element(item) {
                            Some(e) => elements.push(e),
                            None => undecodable += 1,
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(state) = self.state(table.as_ref()) else {
            return;
        };
        if undecodable > 0 {
            state
                .undecodable
                .push(format!("{undecodable} element(s) of set {set:?}"));
        }
        match set.as_deref() {
            Some(model::EXEMPT_SET) => state.exempt.extend(elements),
            Some(model::ALLOWED_SET) => state.allowed.extend(elements),
            Some(model::EXEMPT6_SET) => state.exempt6.extend(elements),
            Some(model::ALLOWED6_SET) => state.allowed6.extend(elements),
            Some(model::CONTAINERS6_SET) => state.containers6.extend(elements),
            Some(name) => {
                if let Some(kind) = model::scope_kind_of_map(name) {
                    for element in &elements {
                        match model::scope_of_element(kind, element) {
                            Some((ifindex, id)) => {
                                let id = state
                                    .scope_ids
                                    .entry(id)
                                    .or_insert_with_key(|id| Arc::from(id.as_str()))
                                    .clone();
                                state.scopes.insert((kind, ifindex), id);
                            }
                            None => state.scopes_unreadable = true,
                        }
                    }
                }
            }
            None => {}
        }
    }

    fn add_chain(&mut self, attributes: &[ChainAttribute]) {
        let mut table = None;
        let mut chain = ChainSpec {
            name: String::new(),
            hook: None,
        };
        let mut kind = None;
        let mut policy = None;
        let mut hook = None;
        for attribute in attributes {
            match attribute {
                ChainAttribute::Table(t) => table = Some(t.clone()),
                ChainAttribute::Name(n) => chain.name = n.clone(),
                ChainAttribute::Type(t) => kind = Some(t.clone()),
                ChainAttribute::Policy(p) => policy = Some(*p),
                ChainAttribute::Hook(parts) => hook = Some(hook_of(parts)),
                _ => {}
            }
        }
        if let Some((hooknum, priority)) = hook {
            chain.hook = Some(ChainHook {
                kind: kind.unwrap_or_default(),
                hooknum,
                priority,
                policy: policy.unwrap_or(u32::MAX),
            });
        }
        if let Some(state) = self.state(table.as_ref()) {
            state.chains.push(chain);
        }
    }

    fn add_rule(&mut self, attributes: &[RuleAttribute]) {
        let mut table = None;
        let mut rule = RuleSpec {
            chain: String::new(),
            exprs: Vec::new(),
        };
        let mut undecodable = false;
        for attribute in attributes {
            match attribute {
                RuleAttribute::Table(t) => table = Some(t.clone()),
                RuleAttribute::Chain(c) => rule.chain = c.clone(),
                RuleAttribute::Expressions(list) => {
                    for item in list {
                        match expression(item) {
                            Some(e) => rule.exprs.push(e),
                            None => undecodable = true,
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(state) = self.state(table.as_ref()) else {
            return;
        };
        if undecodable {
            state
                .undecodable
                .push(format!("a rule in chain {}", rule.chain));
        }
        state.rules.push(rule);
    }

    /// What each of the agent's tables holds.
    pub fn finish(self) -> BTreeMap<AgentTable, ObservedTable> {
        self.tables
            .into_iter()
            .map(|(table, state)| {
                let mut sets = state.sets;
                for set in &mut sets {
                    match set.name.as_str() {
                        model::ALLOWED_SET => set.elements = Some(state.allowed.clone()),
                        model::ALLOWED6_SET => set.elements = Some(state.allowed6.clone()),
                        _ => {}
                    }
                }
                let exempt: Option<BTreeSet<_>> =
                    state.exempt.iter().map(model::exempt_key).collect();
                let exempt6: Option<BTreeSet<_>> =
                    state.exempt6.iter().map(model::exempt6_key).collect();
                let containers6: Option<BTreeSet<_>> = state
                    .containers6
                    .iter()
                    .map(model::container6_address)
                    .collect();
                let scopes = (!state.scopes_unreadable).then_some(state.scopes);
                let readable = state.undecodable.is_empty();
                let mut shape = Shape {
                    flags: state.flags,
                    objects: state.use_count,
                    counters: state.counters,
                    sets,
                    chains: state.chains,
                    rules: state.rules,
                };
                normalise(&mut shape);
                let observed = ObservedTable {
                    shape,
                    owner: state.owner,
                    exempt: exempt.filter(|_| readable),
                    exempt6: exempt6.filter(|_| readable),
                    containers6: containers6.filter(|_| readable),
                    scopes: scopes.filter(|_| readable),
                    rejected: state.rejected,
                    blocked: state.blocked,
                    undecodable: state.undecodable,
                };
                (table, observed)
            })
            .collect()
    }
}

/// Puts a shape in the order comparisons use: rules grouped by chain (keeping their order in
/// the chain), counters, sets and chains by name.
pub fn normalise(shape: &mut Shape) {
    for rule in &mut shape.rules {
        for expr in &mut rule.exprs {
            if let Expr::Bitwise { explicit_op, .. } = expr {
                *explicit_op = false;
            }
        }
    }
    shape.rules.sort_by(|a, b| a.chain.cmp(&b.chain));
    shape.counters.sort();
    shape.sets.sort_by(|a, b| a.name.cmp(&b.name));
    shape.chains.sort_by(|a, b| a.name.cmp(&b.name));
}

fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    value
}

fn c_string(bytes: &[u8]) -> Option<String> {
    let text = bytes.split(|b| *b == 0).next()?;
    String::from_utf8(text.to_vec()).ok()
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// (bytes, packets) of a counter object's `NFTA_OBJ_DATA`.
fn counter_values(nested: &[u8]) -> (u64, u64) {
    let (mut bytes, mut packets) = (0, 0);
    for (kind, value) in wire::attributes(nested).map_while(Result::ok) {
        let value = value
            .get(..8)
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes);
        match (kind, value) {
            (1, Some(v)) => bytes = v,
            (2, Some(v)) => packets = v,
            _ => {}
        }
    }
    (bytes, packets)
}

fn hook_of(parts: &[Hook]) -> (u32, i32) {
    let mut hooknum = u32::MAX;
    let mut priority = 0;
    for part in parts {
        match part {
            Hook::Number(n) => hooknum = u32::from(*n),
            Hook::Priority(p) => priority = *p as i32,
            _ => {}
        }
    }
    (hooknum, priority)
}

fn element(item: &ListAttribute<SetElementAttribute>) -> Option<Element> {
    let attributes = match item {
        ListAttribute::Element(attributes) => attributes.clone(),
        // Element nests numbered other than 1 (as libnftnl numbers them in requests).
        ListAttribute::Other(nest) => {
            let value = nla_value(nest);
            NlasIterator::new(value.as_slice())
                .map(|nla| SetElementAttribute::parse(&nla.ok()?).ok())
                .collect::<Option<Vec<_>>>()?
        }
        _ => return None,
    };
    let mut key = None;
    let mut interval_end = false;
    let mut jump = None;
    for attribute in &attributes {
        match attribute {
            SetElementAttribute::Key(DataAttribute::Value(bytes)) => key = Some(bytes.clone()),
            SetElementAttribute::Flags(flags) => {
                interval_end = flags.bits() & model::ELEM_F_INTERVAL_END != 0;
                if flags.bits() & !model::ELEM_F_INTERVAL_END != 0 {
                    return None;
                }
            }
            SetElementAttribute::Data(DataAttribute::Verdict(parts)) => {
                let mut code = None;
                for part in parts {
                    match part {
                        VerdictAttribute::Code(c) => code = Some(u32::from(*c) as i32),
                        VerdictAttribute::Chain(name) => jump = Some(name.clone()),
                        _ => {}
                    }
                }
                // Only `jump <chain>` is an agent's map value.
                if code != Some(model::NFT_JUMP) || jump.is_none() {
                    return None;
                }
            }
            // Other data, timeouts, expressions: not an element the agent writes.
            SetElementAttribute::Data(_)
            | SetElementAttribute::Timeout(_)
            | SetElementAttribute::Expression(_)
            | SetElementAttribute::ObjectRefrence(_) => return None,
            _ => {}
        }
    }
    Some(Element {
        key: key?,
        interval_end,
        jump,
    })
}

/// The learned elements of a dump of `learned4` or `learned6` (their remaining time as
/// `timeout_ms`); elements that are not the agent's (no `jump host_<mark>`) are left out.
pub fn learned_elements(messages: &[NfTablesMessage]) -> Vec<model::LearnedElement> {
    let mut out = Vec::new();
    for message in messages {
        let NfTablesMessage::NewSetElement(list) = message else {
            continue;
        };
        for attribute in &list.attributes {
            let SetElementList::Elements(items) = attribute else {
                continue;
            };
            out.extend(items.iter().filter_map(learned_element));
        }
    }
    out
}

fn learned_element(item: &ListAttribute<SetElementAttribute>) -> Option<model::LearnedElement> {
    let ListAttribute::Element(attributes) = item else {
        return None;
    };
    let (mut key, mut mark, mut left) = (None, None, None);
    for attribute in attributes {
        match attribute {
            SetElementAttribute::Key(DataAttribute::Value(bytes)) => key = Some(bytes.clone()),
            SetElementAttribute::Expiration(ms) => left = Some(*ms),
            SetElementAttribute::Data(DataAttribute::Verdict(parts)) => {
                for part in parts {
                    if let VerdictAttribute::Chain(name) = part {
                        mark = model::mark_of_host_chain(name);
                    }
                }
            }
            _ => {}
        }
    }
    model::LearnedElement::from_key(&key?, mark?, left?)
}

/// One dumped expression as the typed [`Expr`]; None for anything the agent never writes.
fn expression(item: &ListAttribute<ExpressionAttribute>) -> Option<Expr> {
    let ListAttribute::Element(attributes) = item else {
        return None;
    };
    let data = attributes.iter().find_map(|a| match a {
        ExpressionAttribute::Data(d) => Some(d),
        _ => None,
    })?;
    let value = |d: &DataAttribute| match d {
        DataAttribute::Value(v) => Some(v.clone()),
        _ => None,
    };
    match data {
        Expressions::Meta(attrs) => {
            let (mut key, mut dreg) = (None, None);
            for a in attrs {
                match a {
                    Meta::Key(k) => key = Some(u32::from(*k)),
                    Meta::DestinationRegister(r) => dreg = Some(u32::from(*r)),
                    Meta::SourceRegister(_) => return None,
                    _ => {}
                }
            }
            Some(Expr::Meta {
                key: key?,
                dreg: dreg?,
            })
        }
        Expressions::Payload(attrs) => {
            let (mut base, mut offset, mut len, mut dreg) = (None, None, None, None);
            for a in attrs {
                match a {
                    Payload::Base(v) => base = Some(*v),
                    Payload::Offset(v) => offset = Some(*v),
                    Payload::Len(v) => len = Some(*v),
                    Payload::DestinationRegister(r) => dreg = Some(u32::from(*r)),
                    Payload::SourceRegister(_) => return None,
                    _ => {}
                }
            }
            Some(Expr::Payload {
                base: base?,
                offset: offset?,
                len: len?,
                dreg: dreg?,
            })
        }
        Expressions::Bitwise(attrs) => {
            let (mut sreg, mut dreg, mut mask, mut xor) = (None, None, None, None);
            for a in attrs {
                match a {
                    Bitwise::SourceRegister(r) => sreg = Some(u32::from(*r)),
                    Bitwise::DestinationRegister(r) => dreg = Some(u32::from(*r)),
                    Bitwise::Mask(d) => mask = value(d),
                    Bitwise::Xor(d) => xor = value(d),
                    // Only the boolean (mask and xor) operation, which the kernel reports as 0.
                    Bitwise::Op(op) if *op != 0 => return None,
                    _ => {}
                }
            }
            Some(Expr::Bitwise {
                sreg: sreg?,
                dreg: dreg?,
                mask: mask?,
                xor: xor?,
                explicit_op: false,
            })
        }
        Expressions::Cmp(attrs) => {
            let (mut sreg, mut op, mut data) = (None, None, None);
            for a in attrs {
                match a {
                    Cmp::SourceRegister(r) => sreg = Some(u32::from(*r)),
                    Cmp::Op(o) => op = Some(u32::from(*o)),
                    Cmp::Data(d) => data = value(d),
                    _ => {}
                }
            }
            Some(Expr::Cmp {
                sreg: sreg?,
                op: op?,
                data: data?,
            })
        }
        Expressions::Lookup(attrs) => {
            let (mut sreg, mut set, mut flags, mut dreg) = (None, None, 0, None);
            for a in attrs {
                match a {
                    Lookup::SourceRegister(r) => sreg = Some(u32::from(*r)),
                    Lookup::Set(s) => set = Some(s.clone()),
                    Lookup::Flags(f) => flags = *f,
                    Lookup::DestinationRegister(r) => dreg = Some(u32::from(*r)),
                    _ => {}
                }
            }
            match dreg {
                None => Some(Expr::Lookup {
                    sreg: sreg?,
                    set: set?,
                    flags,
                }),
                // `vmap`: the verdict register, never inverted.
                Some(model::REG_VERDICT) if flags == 0 => Some(Expr::VerdictMap {
                    sreg: sreg?,
                    set: set?,
                }),
                Some(_) => None,
            }
        }
        Expressions::Immediate(attrs) => {
            let mut verdict = None;
            let mut dreg = None;
            let mut loaded = None;
            for a in attrs {
                match a {
                    Immediate::DestinationRegister(r) => dreg = Some(u32::from(*r)),
                    Immediate::Data(DataAttribute::Value(v)) => loaded = Some(v.clone()),
                    Immediate::Data(DataAttribute::Verdict(parts)) => {
                        let mut code = None;
                        let mut chain = None;
                        for part in parts {
                            match part {
                                VerdictAttribute::Code(c) => code = Some(u32::from(*c) as i32),
                                VerdictAttribute::Chain(name) => chain = Some(name.clone()),
                                _ => {}
                            }
                        }
                        verdict = Some(Expr::Verdict { code: code?, chain });
                    }
                    Immediate::Data(_) => return None,
                    _ => {}
                }
            }
            // A verdict goes to the verdict register, a value (the DNS redirect's port) to a
            // data register; anything else is not an expression the agent writes.
            match (dreg, verdict, loaded) {
                (None | Some(0), Some(verdict), None) => Some(verdict),
                (Some(dreg), None, Some(data)) if dreg != 0 => Some(Expr::Immediate { dreg, data }),
                _ => None,
            }
        }
        Expressions::Other {
            expression_type,
            attributes,
        } => match expression_type.as_str() {
            "objref" => {
                let mut kind = None;
                let mut name = None;
                for nla in attributes {
                    match nla.kind() {
                        1 => kind = be_u32(&nla_value(nla)),
                        2 => name = c_string(&nla_value(nla)),
                        _ => {}
                    }
                }
                (kind == Some(model::OBJECT_COUNTER)).then_some(Expr::CounterRef(name?))
            }
            "reject" => {
                let mut kind = None;
                let mut code = None;
                for nla in attributes {
                    match nla.kind() {
                        1 => kind = be_u32(&nla_value(nla)),
                        2 => code = nla_value(nla).first().copied(),
                        _ => {}
                    }
                }
                Some(Expr::Reject {
                    kind: kind?,
                    code: code.unwrap_or(0),
                })
            }
            "limit" => limit(attributes.iter().map(|nla| (nla.kind(), nla_value(nla)))),
            "log" => {
                // Only a group log with a prefix, as the agent writes it: a level, flags,
                // snaplen or queue threshold (which the kernel lists only when set) is not ours.
                let (mut group, mut prefix) = (None, None);
                for nla in attributes {
                    let value = nla_value(nla);
                    match nla.kind() {
                        1 => group = value.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])),
                        2 => prefix = c_string(&value),
                        _ => return None,
                    }
                }
                Some(Expr::Log {
                    group: group?,
                    prefix: prefix?,
                })
            }
            "dynset" => dynset(attributes),
            "ct" => {
                let (mut key, mut dreg, mut sreg) = (None, None, None);
                for nla in attributes {
                    match nla.kind() {
                        1 => dreg = be_u32(&nla_value(nla)),
                        2 => key = be_u32(&nla_value(nla)),
                        4 => sreg = be_u32(&nla_value(nla)),
                        // A direction: not what the agent writes.
                        _ => return None,
                    }
                }
                match (dreg, sreg) {
                    (Some(dreg), None) => Some(Expr::Ct { key: key?, dreg }),
                    (None, Some(sreg)) => Some(Expr::CtSet { key: key?, sreg }),
                    _ => None,
                }
            }
            "redir" => {
                let mut proto_min_reg = None;
                let mut flags = 0;
                for nla in attributes {
                    match nla.kind() {
                        1 => proto_min_reg = be_u32(&nla_value(nla)),
                        3 => flags = be_u32(&nla_value(nla))?,
                        // An address or a port range: not the redirect the agent writes.
                        _ => return None,
                    }
                }
                Some(Expr::Redirect {
                    proto_min_reg: proto_min_reg?,
                    flags,
                })
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests;

/// A named object of a dump: its table, name, type and, for a counter, (bytes, packets).
pub(crate) struct Object {
    pub table: Option<String>,
    pub name: Option<String>,
    pub kind: Option<u32>,
    pub counter: (u64, u64),
}

impl Object {
    pub(crate) fn parse(attributes: &[DefaultNla]) -> Object {
        let mut object = Object {
            table: None,
            name: None,
            kind: None,
            counter: (0, 0),
        };
        for nla in attributes {
            let value = nla_value(nla);
            match nla.kind() & !netlink_packet_core::NLA_F_NESTED {
                1 => object.table = c_string(&value),
                2 => object.name = c_string(&value),
                3 => object.kind = be_u32(&value),
                4 => object.counter = counter_values(&value),
                _ => {}
            }
        }
        object
    }
}

/// The packets of counter `name` of table `table` in a dump's messages (any table, the
/// agent's or not).
pub fn counter_packets(messages: &[NfTablesMessage], table: &str, name: &str) -> Option<u64> {
    messages.iter().find_map(|message| match message {
        NfTablesMessage::NewObject(attributes) => {
            let object = Object::parse(attributes);
            (object.table.as_deref() == Some(table)
                && object.name.as_deref() == Some(name)
                && object.kind == Some(model::OBJECT_COUNTER))
            .then_some(object.counter.1)
        }
        _ => None,
    })
}

/// A `limit` expression from its attributes ((type, value) pairs).
fn limit(attributes: impl Iterator<Item = (u16, Vec<u8>)>) -> Option<Expr> {
    let (mut rate, mut unit, mut burst, mut kind, mut flags) = (None, None, 0, 0, 0);
    for (attribute, value) in attributes {
        match attribute {
            1 => rate = be_u64(&value),
            2 => unit = be_u64(&value),
            3 => burst = be_u32(&value)?,
            4 => kind = be_u32(&value)?,
            5 => flags = be_u32(&value)?,
            _ => return None,
        }
    }
    Some(Expr::Limit {
        rate: rate?,
        unit: unit?,
        burst,
        kind,
        flags,
    })
}

/// `update @set { key limit … }` as the kernel lists it: the key register, the operation, the
/// set's name, a zero timeout and flags (always listed), and one nested `limit`. Anything
/// else (a data register, another operation or expression, a timeout) is not the agent's.
fn dynset(attributes: &[DefaultNla]) -> Option<Expr> {
    const OP_UPDATE: u32 = 1;
    let (mut sreg_key, mut set, mut nested) = (None, None, None);
    for nla in attributes {
        let value = nla_value(nla);
        match nla.kind() & !netlink_packet_core::NLA_F_NESTED {
            1 => set = c_string(&value),
            // The set id is a transaction's; the kernel does not list it.
            2 => {}
            3 if be_u32(&value)? == OP_UPDATE => {}
            4 => sreg_key = be_u32(&value),
            // NFTA_DYNSET_TIMEOUT and NFTA_DYNSET_FLAGS: listed as zero when unset; and the
            // padding a 64-bit attribute may bring (NFTA_DYNSET_PAD).
            6 if be_u64(&value)? == 0 => {}
            9 if be_u32(&value)? == 0 => {}
            8 => {}
            7 if nested.is_none() => nested = Some(value),
            _ => return None,
        }
    }
    let nested = nested?;
    let mut name = None;
    let mut data = None;
    for attribute in wire::attributes(&nested) {
        let (attribute, value) = attribute.ok()?;
        match attribute {
            1 => name = c_string(value),
            2 => data = Some(value),
            _ => return None,
        }
    }
    if name.as_deref() != Some("limit") {
        return None;
    }
    let limit = limit(
        wire::attributes(data?)
            .map(|a| a.map(|(kind, value)| (kind, value.to_vec())))
            .collect::<Result<Vec<_>, _>>()
            .ok()?
            .into_iter(),
    )?;
    Some(Expr::Dynset {
        sreg_key: sreg_key?,
        set: set?,
        limit: Box::new(limit),
    })
}
