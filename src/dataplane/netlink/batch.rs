//! Building nf_tables batches: typed operations -> netlink messages -> bytes (pure).
//!
//! A [`Batch`] is the list of operations one transaction applies; [`Batch::encode`] frames
//! them between `NFNL_MSG_BATCH_BEGIN` and `NFNL_MSG_BATCH_END` with consecutive sequence
//! numbers. Messages are built with `netlink-packet-netfilter`'s types; the pieces it does not
//! model (the `objref` and `reject` expressions, counter objects, set element lists) are built
//! here as plain attributes, in the layout nft itself sends.

use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
};
use netlink_packet_netfilter::nftables::Bitwise;
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    HookNumber, Immediate, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetDescription, SetElementList,
    SetElementMessage, SetFlags, SetMessage, TableAttribute, TableFlags, TableMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use crate::dataplane::model::{
    self, AgentTable, ChainSpec, DATA_VERDICT, ELEM_F_INTERVAL_END, Element, Expr, LearnedElement,
    NFT_JUMP, OBJECT_COUNTER, REG_VERDICT, RuleSpec, SetSpec,
};

/// `NFT_BITWISE_BOOL`: `(reg & mask) ^ xor`.
const NFT_BITWISE_BOOL: u32 = 0;

/// `NFNL_SUBSYS_NFTABLES`: the batch header's resource id says which subsystem it is for.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Elements per set element message: keeps each message far below the netlink message size
/// limits however many containers a cell runs (nft splits large sets the same way).
pub const ELEMENTS_PER_MESSAGE: usize = 512;

/// nf_tables attribute numbers the crate does not name (linux/netfilter/nf_tables.h).
mod attr {
    pub const OBJ_TABLE: u16 = 1;
    pub const OBJ_NAME: u16 = 2;
    pub const OBJ_TYPE: u16 = 3;
    pub const OBJ_DATA: u16 = 4;
    pub const COUNTER_BYTES: u16 = 1;
    pub const COUNTER_PACKETS: u16 = 2;
    pub const OBJREF_IMM_TYPE: u16 = 1;
    pub const OBJREF_IMM_NAME: u16 = 2;
    pub const REJECT_TYPE: u16 = 1;
    pub const REJECT_ICMP_CODE: u16 = 2;
    pub const LIMIT_RATE: u16 = 1;
    pub const LIMIT_UNIT: u16 = 2;
    pub const LIMIT_BURST: u16 = 3;
    pub const LIMIT_TYPE: u16 = 4;
    pub const LIMIT_FLAGS: u16 = 5;
    pub const LOG_GROUP: u16 = 1;
    pub const LOG_PREFIX: u16 = 2;
    pub const SET_ELEM_KEY: u16 = 1;
    pub const SET_ELEM_FLAGS: u16 = 3;
    pub const SET_ELEM_DATA: u16 = 2;
    pub const DATA_VALUE: u16 = 1;
    pub const DATA_VERDICT_NEST: u16 = 2;
    pub const VERDICT_CODE: u16 = 1;
    pub const VERDICT_CHAIN: u16 = 2;
    pub const REDIR_REG_PROTO_MIN: u16 = 1;
    pub const REDIR_FLAGS: u16 = 3;
    pub const DYNSET_SET_NAME: u16 = 1;
    pub const DYNSET_SET_ID: u16 = 2;
    pub const DYNSET_OP: u16 = 3;
    pub const DYNSET_SREG_KEY: u16 = 4;
    pub const DYNSET_EXPR: u16 = 7;
    /// `NFT_DYNSET_OP_UPDATE`.
    pub const DYNSET_OP_UPDATE: u32 = 1;
    pub const CT_DREG: u16 = 1;
    pub const CT_KEY: u16 = 2;
    pub const CT_SREG: u16 = 4;
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `add table` (no flags attribute: a no-op on an existing table whatever its flags) or,
    /// with flags, the creation of the table with those flags.
    AddTable {
        table: AgentTable,
        flags: Option<u32>,
    },
    DeleteTable(AgentTable),
    AddCounter {
        table: AgentTable,
        name: &'static str,
    },
    /// A set created in this batch, with its batch-local id (rules and elements in the same
    /// batch refer to it by name and id, as nft does).
    AddSet {
        table: AgentTable,
        set: SetSpec,
        id: u32,
    },
    AddChain {
        table: AgentTable,
        chain: ChainSpec,
    },
    AddRule {
        table: AgentTable,
        rule: RuleSpec,
    },
    /// Elements added to a set; `set_id` when the set is created in the same batch.
    AddElements {
        table: AgentTable,
        set: &'static str,
        set_id: Option<u32>,
        elements: Vec<Element>,
    },
    DeleteElements {
        table: AgentTable,
        set: &'static str,
        elements: Vec<Element>,
    },
    /// `flush chain`: every rule of the chain (a rule delete naming only the chain).
    FlushChain {
        table: AgentTable,
        chain: String,
    },
    /// `delete chain` (it must hold no rules and no jump may lead to it).
    DeleteChain {
        table: AgentTable,
        chain: String,
    },
    /// Addresses the DNS filter learned, each with its own timeout, into `learned4` or
    /// `learned6` (all of one map).
    AddLearned {
        table: AgentTable,
        elements: Vec<LearnedElement>,
    },
    /// Learned addresses removed (by key), all of one map.
    DeleteLearned {
        table: AgentTable,
        elements: Vec<LearnedElement>,
    },
}

impl Op {
    pub fn table(&self) -> AgentTable {
        match self {
            Op::AddTable { table, .. }
            | Op::AddCounter { table, .. }
            | Op::AddSet { table, .. }
            | Op::AddChain { table, .. }
            | Op::AddRule { table, .. }
            | Op::AddElements { table, .. }
            | Op::DeleteElements { table, .. }
            | Op::FlushChain { table, .. }
            | Op::DeleteChain { table, .. }
            | Op::AddLearned { table, .. }
            | Op::DeleteLearned { table, .. } => *table,
            Op::DeleteTable(table) => *table,
        }
    }

    /// Words for logs and errors: which operation the kernel refused.
    pub fn describe(&self) -> String {
        let t = self.table().name();
        match self {
            Op::AddTable { flags: Some(f), .. } => format!("add table inet {t} (flags {f:#x})"),
            Op::AddTable { .. } => format!("add table inet {t}"),
            Op::DeleteTable(_) => format!("delete table inet {t}"),
            Op::FlushChain { chain, .. } => format!("flush chain inet {t} {chain}"),
            Op::DeleteChain { chain, .. } => format!("delete chain inet {t} {chain}"),
            Op::AddCounter { name, .. } => format!("add counter inet {t} {name}"),
            Op::AddSet { set, .. } => format!("add set inet {t} {}", set.name),
            Op::AddChain { chain, .. } => format!("add chain inet {t} {}", chain.name),
            Op::AddRule { rule, .. } => format!("add rule inet {t} {}", rule.chain),
            Op::AddElements { set, elements, .. } => {
                format!("add element inet {t} {set} ({} elements)", elements.len())
            }
            Op::DeleteElements { set, elements, .. } => {
                format!(
                    "delete element inet {t} {set} ({} elements)",
                    elements.len()
                )
            }
            Op::AddLearned { elements, .. } => format!(
                "add element inet {t} {} ({} elements)",
                learned_map_of(elements),
                elements.len()
            ),
            Op::DeleteLearned { elements, .. } => format!(
                "delete element inet {t} {} ({} elements)",
                learned_map_of(elements),
                elements.len()
            ),
        }
    }

    /// The netlink messages (usually one; element lists are split).
    fn messages(&self, set_ids: &dyn Fn(AgentTable, &str) -> Option<u32>) -> Vec<NfTablesMessage> {
        match self {
            Op::AddTable { table, flags } => {
                let mut attributes = vec![TableAttribute::Name(table.name().into())];
                if let Some(flags) = flags {
                    attributes.push(TableAttribute::Flags(TableFlags::from_bits_retain(*flags)));
                }
                vec![NfTablesMessage::NewTable(TableMessage { attributes })]
            }
            Op::FlushChain { table, chain } => vec![NfTablesMessage::DeleteRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(table.name().into()),
                    RuleAttribute::Chain(chain.clone()),
                ],
            })],
            Op::DeleteChain { table, chain } => vec![NfTablesMessage::DeleteChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(table.name().into()),
                    ChainAttribute::Name(chain.clone()),
                ],
            })],
            Op::DeleteTable(table) => vec![NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(table.name().into())],
            })],
            Op::AddCounter { table, name } => vec![NfTablesMessage::NewObject(vec![
                string_nla(attr::OBJ_TABLE, table.name()),
                string_nla(attr::OBJ_NAME, name),
                u32_nla(attr::OBJ_TYPE, OBJECT_COUNTER),
                nested_nla(
                    attr::OBJ_DATA,
                    &[
                        DefaultNla::new(attr::COUNTER_BYTES, 0u64.to_be_bytes().to_vec()),
                        DefaultNla::new(attr::COUNTER_PACKETS, 0u64.to_be_bytes().to_vec()),
                    ],
                ),
            ])],
            Op::AddSet { table, set, id } => vec![NfTablesMessage::NewSet(SetMessage {
                attributes: vec![
                    SetAttribute::Table(table.name().into()),
                    SetAttribute::Name(set.name.into()),
                    SetAttribute::Flags(SetFlags::from_bits_retain(set.flags)),
                    SetAttribute::KeyType(set.key_type),
                    SetAttribute::KeyLen(set.key_len),
                ]
                .into_iter()
                .chain(
                    set.verdict_map
                        .then_some([
                            SetAttribute::DataType(DATA_VERDICT),
                            SetAttribute::DataLen(0),
                        ])
                        .into_iter()
                        .flatten(),
                )
                .chain([SetAttribute::Id(*id)])
                .chain(set.bounds.into_iter().flat_map(|b| {
                    // A map whose elements each carry their timeout has no default one.
                    [
                        Some(SetAttribute::Description(vec![SetDescription::Size(
                            b.size,
                        )])),
                        (b.timeout_ms > 0).then_some(SetAttribute::Timeout(b.timeout_ms)),
                    ]
                    .into_iter()
                    .flatten()
                }))
                .chain([SetAttribute::UserData(set.userdata.clone())])
                .collect(),
            })],
            Op::AddChain { table, chain } => {
                let mut attributes = vec![
                    ChainAttribute::Table(table.name().into()),
                    ChainAttribute::Name(chain.name.clone()),
                ];
                if let Some(hook) = &chain.hook {
                    attributes.extend([
                        ChainAttribute::Type(hook.kind.clone()),
                        ChainAttribute::Policy(hook.policy),
                        ChainAttribute::Hook(vec![
                            Hook::Number(HookNumber::Other(hook.hooknum)),
                            // The kernel reads the priority as a signed 32-bit number.
                            Hook::Priority(hook.priority as u32),
                        ]),
                    ]);
                }
                vec![NfTablesMessage::NewChain(ChainMessage { attributes })]
            }
            Op::AddRule { table, rule } => {
                let expressions = rule
                    .exprs
                    .iter()
                    .map(|e| expression(e, |set| set_ids(*table, set)))
                    .collect();
                vec![NfTablesMessage::NewRule(RuleMessage {
                    attributes: vec![
                        RuleAttribute::Table(table.name().into()),
                        RuleAttribute::Chain(rule.chain.clone()),
                        RuleAttribute::Expressions(expressions),
                    ],
                })]
            }
            Op::AddElements {
                table,
                set,
                set_id,
                elements,
            } => elements
                .chunks(ELEMENTS_PER_MESSAGE)
                .map(|chunk| {
                    let mut attributes = vec![
                        SetElementList::Table(table.name().into()),
                        SetElementList::Set((*set).into()),
                    ];
                    if let Some(id) = set_id {
                        attributes.push(SetElementList::SetId(*id));
                    }
                    attributes.push(element_list(chunk, true));
                    NfTablesMessage::NewSetElement(SetElementMessage { attributes })
                })
                .collect(),
            Op::AddLearned { table, elements } | Op::DeleteLearned { table, elements } => {
                let adding = matches!(self, Op::AddLearned { .. });
                elements
                    .chunks(ELEMENTS_PER_MESSAGE)
                    .map(|chunk| {
                        let message = SetElementMessage {
                            attributes: vec![
                                SetElementList::Table(table.name().into()),
                                SetElementList::Set(learned_map_of(chunk).into()),
                                learned_list(chunk, adding),
                            ],
                        };
                        if adding {
                            NfTablesMessage::NewSetElement(message)
                        } else {
                            NfTablesMessage::DeleteSetElement(message)
                        }
                    })
                    .collect()
            }
            Op::DeleteElements {
                table,
                set,
                elements,
            } => elements
                .chunks(ELEMENTS_PER_MESSAGE)
                .map(|chunk| {
                    NfTablesMessage::DeleteSetElement(SetElementMessage {
                        attributes: vec![
                            SetElementList::Table(table.name().into()),
                            SetElementList::Set((*set).into()),
                            element_list(chunk, false),
                        ],
                    })
                })
                .collect(),
        }
    }
}

/// One transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub ops: Vec<Op>,
}

/// A batch as bytes, with what each sequence number stands for (to name a refused operation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    pub bytes: Vec<u8>,
    /// (sequence number, index into `Batch::ops`) of every message that the kernel acks.
    pub acked: Vec<(u32, usize)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Whether the batch creates the owned table (so a refusal may mean "no owner support").
    pub fn creates_owned_table(&self) -> bool {
        self.ops.iter().any(|op| {
            matches!(
                op,
                Op::AddTable {
                    table: AgentTable::Owned,
                    flags: Some(_)
                }
            )
        })
    }

    /// The batch without anything touching `table`.
    pub fn without(&self, table: AgentTable) -> Batch {
        Batch {
            ops: self
                .ops
                .iter()
                .filter(|op| op.table() != table)
                .cloned()
                .collect(),
        }
    }

    /// Frames the batch; messages get sequence numbers from `first_seq` on, each asks for an
    /// acknowledgement so that every refusal is reported with the operation it refused.
    pub fn encode(&self, first_seq: u32) -> EncodedBatch {
        let set_ids = |table: AgentTable, set: &str| {
            self.ops.iter().find_map(|op| match op {
                Op::AddSet {
                    table: t,
                    set: s,
                    id,
                } if *t == table && s.name == set => Some(*id),
                _ => None,
            })
        };
        let mut bytes = Vec::new();
        let mut acked = Vec::new();
        let mut seq = first_seq;
        append(
            &mut bytes,
            control(ControlMessage::BatchBegin),
            NLM_F_REQUEST,
            seq,
        );
        for (index, op) in self.ops.iter().enumerate() {
            for message in op.messages(&set_ids) {
                seq = seq.wrapping_add(1);
                let flags = NLM_F_REQUEST | NLM_F_ACK | create_flag(&message);
                append(&mut bytes, nftables(message), flags, seq);
                acked.push((seq, index));
            }
        }
        seq = seq.wrapping_add(1);
        append(
            &mut bytes,
            control(ControlMessage::BatchEnd),
            NLM_F_REQUEST,
            seq,
        );
        EncodedBatch { bytes, acked }
    }
}

/// NLM_F_CREATE for additions; rules also NLM_F_APPEND (without it the kernel inserts each
/// rule at the head of its chain, reversing their order).
fn create_flag(message: &NfTablesMessage) -> u16 {
    match message {
        NfTablesMessage::DeleteTable(_)
        | NfTablesMessage::DeleteSetElement(_)
        | NfTablesMessage::DeleteRule(_)
        | NfTablesMessage::DeleteChain(_) => 0,
        NfTablesMessage::NewRule(_) => NLM_F_CREATE | NLM_F_APPEND,
        _ => NLM_F_CREATE,
    }
}

fn control(message: ControlMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        message,
    )
}

fn nftables(message: NfTablesMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        message,
    )
}

/// Serialises one message onto `out` (netlink messages are 4-byte aligned already).
pub(super) fn append(out: &mut Vec<u8>, message: NetfilterMessage, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    let start = out.len();
    out.resize(start + message.buffer_len(), 0);
    message.serialize(&mut out[start..]);
}

fn string_nla(kind: u16, value: &str) -> DefaultNla {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    DefaultNla::new(kind, bytes)
}

fn u32_nla(kind: u16, value: u32) -> DefaultNla {
    DefaultNla::new(kind, value.to_be_bytes().to_vec())
}

/// A nested attribute holding `inner`.
fn nested_nla<T: Nla>(kind: u16, inner: &[T]) -> DefaultNla {
    let mut value = vec![0; inner.buffer_len()];
    inner.emit(&mut value);
    DefaultNla::new(kind | NLA_F_NESTED, value)
}

/// `NFTA_SET_ELEM_LIST_ELEMENTS`: one nest per element. A map element's value (`jump
/// <chain>`) goes with an addition only: a deletion names the key.
fn element_list(elements: &[Element], with_data: bool) -> SetElementList {
    numbered_elements(elements.iter().map(|element| {
        let mut attrs = Vec::with_capacity(3);
        if element.interval_end {
            attrs.push(u32_nla(attr::SET_ELEM_FLAGS, ELEM_F_INTERVAL_END));
        }
        attrs.push(element_key(element.key.clone()));
        if let (Some(chain), true) = (&element.jump, with_data) {
            attrs.push(jump_data(chain));
        }
        attrs
    }))
}

/// The learned map `elements` belong in (an operation holds elements of one map).
fn learned_map_of(elements: &[LearnedElement]) -> &'static str {
    elements
        .first()
        .map_or(model::LEARNED4_MAP, LearnedElement::map)
}

/// Learned elements as nft sends them: the timeout (additions only), the key, and on an
/// addition the verdict `jump host_<mark>`.
fn learned_list(elements: &[LearnedElement], adding: bool) -> SetElementList {
    numbered_elements(elements.iter().map(|element| {
        let mut attrs = Vec::with_capacity(3);
        if adding {
            attrs.push(DefaultNla::new(
                model::SET_ELEM_TIMEOUT,
                element.timeout_ms.to_be_bytes().to_vec(),
            ));
        }
        attrs.push(element_key(element.key()));
        if adding {
            attrs.push(jump_data(&model::host_chain(element.mark)));
        }
        attrs
    }))
}

/// `NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }`.
fn element_key(key: Vec<u8>) -> DefaultNla {
    nested_nla(
        attr::SET_ELEM_KEY,
        &[DefaultNla::new(attr::DATA_VALUE, key)],
    )
}

/// `NFTA_SET_ELEM_DATA { NFTA_DATA_VERDICT { jump <chain> } }`: a map element's value.
fn jump_data(chain: &str) -> DefaultNla {
    let verdict = nested_nla(
        attr::DATA_VERDICT_NEST,
        &[
            DefaultNla::new(attr::VERDICT_CODE, NFT_JUMP.to_be_bytes().to_vec()),
            string_nla(attr::VERDICT_CHAIN, chain),
        ],
    );
    nested_nla(attr::SET_ELEM_DATA, &[verdict])
}

/// The elements' attributes, one nest each, numbered from 1 as libnftnl numbers them (the
/// kernel ignores the number). `SetElementList::Other` keeps our numbering; the crate's own
/// list numbers every nest 1.
fn numbered_elements(elements: impl Iterator<Item = Vec<DefaultNla>>) -> SetElementList {
    let nests: Vec<DefaultNla> = elements
        .enumerate()
        .map(|(i, attrs)| {
            let index = u16::try_from(i + 1).unwrap_or(u16::MAX) & !NLA_F_NESTED;
            nested_nla(index, &attrs)
        })
        .collect();
    let mut value = vec![0; nests.as_slice().buffer_len()];
    nests.as_slice().emit(&mut value);
    SetElementList::Other(DefaultNla::new(3 | NLA_F_NESTED, value))
}

/// One expression as `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA }`.
fn expression(
    expr: &Expr,
    set_id: impl Fn(&str) -> Option<u32>,
) -> ListAttribute<ExpressionAttribute> {
    let reg = |r: u32| Register::from(r);
    let data = |bytes: &[u8]| DataAttribute::Value(bytes.to_vec());
    let typed = match expr {
        Expr::Meta { key, dreg } => Expressions::Meta(vec![
            Meta::Key(MetaKey::from(*key)),
            Meta::DestinationRegister(reg(*dreg)),
        ]),
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => Expressions::Payload(vec![
            Payload::DestinationRegister(reg(*dreg)),
            Payload::Base(*base),
            Payload::Offset(*offset),
            Payload::Len(*len),
        ]),
        Expr::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
            explicit_op,
        } => {
            let mut attrs = vec![
                Bitwise::SourceRegister(reg(*sreg)),
                Bitwise::DestinationRegister(reg(*dreg)),
            ];
            if *explicit_op {
                attrs.push(Bitwise::Op(NFT_BITWISE_BOOL));
            }
            attrs.extend([
                Bitwise::Length(u32::try_from(mask.len()).unwrap_or(u32::MAX)),
                Bitwise::Mask(data(mask)),
                Bitwise::Xor(data(xor)),
            ]);
            Expressions::Bitwise(attrs)
        }
        Expr::Cmp { sreg, op, data: d } => Expressions::Cmp(vec![
            Cmp::SourceRegister(reg(*sreg)),
            Cmp::Op(Operator::from(*op)),
            Cmp::Data(data(d)),
        ]),
        Expr::VerdictMap { sreg, set } => {
            let mut attrs = vec![
                Lookup::SourceRegister(reg(*sreg)),
                Lookup::DestinationRegister(reg(REG_VERDICT)),
                Lookup::Set(set.clone()),
            ];
            if let Some(id) = set_id(set) {
                attrs.push(Lookup::SetId(id));
            }
            Expressions::Lookup(attrs)
        }
        Expr::Lookup { sreg, set, flags } => {
            let mut attrs = vec![Lookup::SourceRegister(reg(*sreg)), Lookup::Set(set.clone())];
            if let Some(id) = set_id(set) {
                attrs.push(Lookup::SetId(id));
            }
            if *flags != 0 {
                attrs.push(Lookup::Flags(*flags));
            }
            Expressions::Lookup(attrs)
        }
        Expr::Verdict { code, chain } => {
            let mut verdict = vec![VerdictAttribute::Code(Verdict::from(*code as u32))];
            if let Some(chain) = chain {
                verdict.push(VerdictAttribute::Chain(chain.clone()));
            }
            Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Verdict),
                Immediate::Data(DataAttribute::Verdict(verdict)),
            ])
        }
        Expr::CounterRef(name) => Expressions::Other {
            expression_type: "objref".into(),
            attributes: vec![
                u32_nla(attr::OBJREF_IMM_TYPE, OBJECT_COUNTER),
                // nft sends the object's name here without a terminating NUL.
                DefaultNla::new(attr::OBJREF_IMM_NAME, name.as_bytes().to_vec()),
            ],
        },
        Expr::Reject { kind, code } => Expressions::Other {
            expression_type: "reject".into(),
            attributes: vec![
                u32_nla(attr::REJECT_TYPE, *kind),
                DefaultNla::new(attr::REJECT_ICMP_CODE, vec![*code]),
            ],
        },
        // Attributes in the order nft sends them.
        Expr::Limit { .. } => limit(expr),
        Expr::Dynset {
            sreg_key,
            set,
            limit: per_element,
        } => {
            let mut attributes = vec![
                u32_nla(attr::DYNSET_SREG_KEY, *sreg_key),
                u32_nla(attr::DYNSET_OP, attr::DYNSET_OP_UPDATE),
                string_nla(attr::DYNSET_SET_NAME, set),
            ];
            if let Some(id) = set_id(set) {
                attributes.push(u32_nla(attr::DYNSET_SET_ID, id));
            }
            // The element's expression, nested as a rule's expression is.
            let nested: ListAttribute<ExpressionAttribute> = limit(per_element).into();
            let mut value = vec![0; nested.value_len()];
            nested.emit_value(&mut value);
            attributes.push(DefaultNla::new(attr::DYNSET_EXPR | NLA_F_NESTED, value));
            Expressions::Other {
                expression_type: "dynset".into(),
                attributes,
            }
        }
        Expr::Log { group, prefix } => Expressions::Other {
            expression_type: "log".into(),
            attributes: vec![
                string_nla(attr::LOG_PREFIX, prefix),
                DefaultNla::new(attr::LOG_GROUP, group.to_be_bytes().to_vec()),
            ],
        },
        Expr::Ct { key, dreg } => Expressions::Other {
            expression_type: "ct".into(),
            attributes: vec![u32_nla(attr::CT_KEY, *key), u32_nla(attr::CT_DREG, *dreg)],
        },
        Expr::CtSet { key, sreg } => Expressions::Other {
            expression_type: "ct".into(),
            attributes: vec![u32_nla(attr::CT_KEY, *key), u32_nla(attr::CT_SREG, *sreg)],
        },
        Expr::Immediate { dreg, data: d } => Expressions::Immediate(vec![
            Immediate::DestinationRegister(reg(*dreg)),
            Immediate::Data(data(d)),
        ]),
        Expr::Redirect {
            proto_min_reg,
            flags,
        } => Expressions::Other {
            expression_type: "redir".into(),
            attributes: vec![
                u32_nla(attr::REDIR_REG_PROTO_MIN, *proto_min_reg),
                u32_nla(attr::REDIR_FLAGS, *flags),
            ],
        },
    };
    typed.into()
}

/// A `limit` expression's data (anything else gives an empty `limit`, which the kernel
/// refuses: the model only ever nests a limit).
fn limit(expr: &Expr) -> Expressions {
    let attributes = match expr {
        Expr::Limit {
            rate,
            unit,
            burst,
            kind,
            flags,
        } => vec![
            DefaultNla::new(attr::LIMIT_RATE, rate.to_be_bytes().to_vec()),
            DefaultNla::new(attr::LIMIT_UNIT, unit.to_be_bytes().to_vec()),
            u32_nla(attr::LIMIT_BURST, *burst),
            u32_nla(attr::LIMIT_TYPE, *kind),
            u32_nla(attr::LIMIT_FLAGS, *flags),
        ],
        _ => Vec::new(),
    };
    Expressions::Other {
        expression_type: "limit".into(),
        attributes,
    }
}

#[cfg(test)]
pub(crate) mod tests;
