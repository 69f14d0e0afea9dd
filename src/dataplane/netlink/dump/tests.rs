use super::*;
use crate::dataplane::netlink::batch::{Batch, Op};
use crate::policy::{DesiredRules, ExemptKey};
use netlink_packet_core::NetlinkMessage;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_netfilter::NetfilterMessageInner;
use std::net::Ipv4Addr;

fn desired() -> DesiredRules {
    DesiredRules {
        allowed6: Vec::new(),
        exempt6: Default::default(),
        containers6: Default::default(),
        mode: Default::default(),
        overlay: "10.255.0.0/16".parse().expect("literal"),
        allowed: vec!["10.0.0.0/8".parse().expect("literal")],
        exempt: [ExemptKey {
            ifindex: 12,
            ip: Ipv4Addr::new(10, 255, 1, 4),
        }]
        .into(),
        dns: None,
        rule_set: Default::default(),
        scopes: Default::default(),
    }
}

/// What the kernel would list for a table the agent created: the creation messages read
/// back as NEW* replies (the kernel answers dumps with the same message types and
/// attributes, plus handles and use counts this decoder ignores).
fn listing_of(batch: &Batch) -> Listing {
    let encoded = batch.encode(1);
    let mut listing = Listing::default();
    let mut rest = encoded.bytes.as_slice();
    while !rest.is_empty() {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4")) as usize;
        let message: NetlinkMessage<NetfilterMessage> =
            NetlinkMessage::deserialize(&rest[..len]).expect("parses");
        if let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(nft),
            ..
        }) = message.payload
        {
            listing.add(&nft);
        }
        rest = &rest[len..];
    }
    listing
}

/// The socket decodes set-element messages itself (the crate's list parser is quadratic):
/// every message of a table with 2,000 exemptions decodes exactly as the crate decodes it,
/// and a message cut short is left to the crate.
#[test]
fn set_elements_decode_as_the_crate_decodes_them() {
    let mut rules = desired();
    rules.exempt = (0..2_000u32)
        .map(|i| ExemptKey {
            ifindex: 100 + i,
            ip: Ipv4Addr::from(0x0aff_0000 + i + 2),
        })
        .collect();
    let encoded = crate::dataplane::plan::create(AgentTable::Owned, &rules).encode(1);
    let mut rest = encoded.bytes.as_slice();
    let mut elements = 0;
    while !rest.is_empty() {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4")) as usize;
        let bytes = &rest[..len];
        rest = &rest[len..];
        let Ok(message) = NetlinkMessage::<NetfilterMessage>::deserialize(bytes) else {
            continue;
        };
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(crate_parse),
            ..
        }) = message.payload
        else {
            continue;
        };
        let ours = super::super::socket::decode_reply(bytes).expect("decodes");
        assert_eq!(ours, crate_parse);
        if let NfTablesMessage::NewSetElement(SetElementMessage { attributes }) = &ours {
            for attribute in attributes {
                if let SetElementList::Elements(list) = attribute {
                    elements += list.len();
                }
            }
            let mut cut = bytes[..bytes.len() - 4].to_vec();
            let cut_len = cut.len() as u32;
            cut[0..4].copy_from_slice(&cut_len.to_ne_bytes());
            assert!(super::super::socket::decode_set_elements(&cut).is_none());
        }
    }
    // The exemptions, and the allowed intervals' elements.
    assert!(elements > 2_000, "{elements} elements");
}

#[test]
fn a_created_table_reads_back_as_its_shape() {
    let rules = desired();
    let batch = crate::dataplane::plan::create(AgentTable::Persistent, &rules);
    let mut listing = listing_of(&batch);
    // The kernel's table listing carries its use count: 3 chains, 11 sets, 8 counters.
    listing.add(&NfTablesMessage::NewTable(TableMessage {
        attributes: vec![
            TableAttribute::Name("egress_guard".into()),
            TableAttribute::Use(22),
        ],
    }));
    let observed = listing.finish();
    let table = &observed[&AgentTable::Persistent];
    let mut expected = model::shape(AgentTable::Persistent, &rules);
    normalise(&mut expected);
    assert_eq!(table.shape, expected);
    assert_eq!(table.exempt, Some(rules.exempt.clone()));
    assert!(table.undecodable.is_empty());
}

/// Every expression the agent writes decodes back (or the agent would see permanent
/// drift), in both modes and both tables; a log with extras the agent never writes does not.
#[test]
fn limit_and_log_read_back_in_both_modes() {
    for mode in [crate::config::Mode::Enforce, crate::config::Mode::Audit] {
        let mut rules = desired();
        rules.mode = mode;
        for table in AgentTable::ALL {
            let batch = crate::dataplane::plan::create(table, &rules);
            let mut listing = listing_of(&batch);
            listing.add(&NfTablesMessage::NewTable(TableMessage {
                attributes: vec![
                    TableAttribute::Name(table.name().into()),
                    TableAttribute::Use(22),
                    TableAttribute::Flags(
                        netlink_packet_netfilter::nftables::TableFlags::from_bits_retain(
                            table.flags(),
                        ),
                    ),
                ],
            }));
            let observed = listing.finish();
            let mut expected = model::shape(table, &rules);
            normalise(&mut expected);
            assert_eq!(observed[&table].shape, expected, "{mode:?} {table:?}");
        }
    }
    let with_level = ListAttribute::Element(vec![
        ExpressionAttribute::Name("log".into()),
        ExpressionAttribute::Data(Expressions::Other {
            expression_type: "log".into(),
            attributes: vec![
                DefaultNla::new(1, 9851u16.to_be_bytes().to_vec()),
                DefaultNla::new(3, 4u32.to_be_bytes().to_vec()),
            ],
        }),
    ]);
    assert_eq!(expression(&with_level), None);
}

#[test]
fn a_table_with_the_dns_chain_reads_back_as_its_shape() {
    let mut rules = desired();
    rules.dns = Some(crate::policy::DnsRules::on_port(9853));
    let batch = crate::dataplane::plan::create(AgentTable::Owned, &rules);
    let mut listing = listing_of(&batch);
    listing.add(&NfTablesMessage::NewTable(TableMessage {
        attributes: vec![
            TableAttribute::Name("egress_guard_owned".into()),
            TableAttribute::Flags(
                netlink_packet_netfilter::nftables::TableFlags::from_bits_retain(2),
            ),
            TableAttribute::Use(24),
        ],
    }));
    let observed = listing.finish();
    let table = &observed[&AgentTable::Owned];
    assert!(table.undecodable.is_empty(), "{:?}", table.undecodable);
    let mut expected = model::shape(AgentTable::Owned, &rules);
    normalise(&mut expected);
    assert_eq!(table.shape, expected);
    // The same kernel state is a difference when DNS should be off (or on another port).
    for other in [None, Some(5300)] {
        rules.dns = other.map(crate::policy::DnsRules::on_port);
        let mut expected = model::shape(AgentTable::Owned, &rules);
        normalise(&mut expected);
        assert_ne!(table.shape, expected, "{other:?}");
    }
}

#[test]
fn other_tables_are_ignored() {
    let mut batch = Batch::default();
    batch.push(Op::AddTable {
        table: AgentTable::Owned,
        flags: Some(2),
    });
    let mut listing = listing_of(&batch);
    listing.add(&NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name("filter".into())],
    }));
    let observed = listing.finish();
    assert_eq!(
        observed.keys().copied().collect::<Vec<_>>(),
        vec![AgentTable::Owned]
    );
    assert_eq!(observed[&AgentTable::Owned].shape.flags, 2);
}

#[test]
fn counters_are_read_as_u64() {
    let mut listing = Listing::default();
    listing.add(&NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name("egress_guard".into())],
    }));
    let mut data = Vec::new();
    for (kind, value) in [(1u16, 7_000_000_000u64), (2, 5_000_000_000)] {
        data.extend_from_slice(&12u16.to_ne_bytes());
        data.extend_from_slice(&kind.to_ne_bytes());
        data.extend_from_slice(&value.to_be_bytes());
    }
    listing.add(&NfTablesMessage::NewObject(vec![
        DefaultNla::new(1, b"egress_guard\0".to_vec()),
        DefaultNla::new(2, b"rejected_other\0".to_vec()),
        DefaultNla::new(3, 1u32.to_be_bytes().to_vec()),
        DefaultNla::new(4 | netlink_packet_core::NLA_F_NESTED, data),
    ]));
    let observed = listing.finish();
    let rejected = observed[&AgentTable::Persistent].rejected;
    assert_eq!(rejected.other_packets, 5_000_000_000);
    assert_eq!(rejected.other_bytes, 7_000_000_000);
}

#[test]
fn an_added_accept_rule_is_a_difference() {
    let rules = desired();
    let mut batch = crate::dataplane::plan::create(AgentTable::Persistent, &rules);
    batch.push(Op::AddRule {
        table: AgentTable::Persistent,
        rule: RuleSpec {
            chain: model::EGRESS_CHAIN.into(),
            exprs: vec![Expr::Verdict {
                code: 1,
                chain: None,
            }],
        },
    });
    let observed = listing_of(&batch).finish();
    let mut expected = model::shape(AgentTable::Persistent, &rules);
    normalise(&mut expected);
    assert_ne!(observed[&AgentTable::Persistent].shape, expected);
}

#[test]
fn requests_are_dumps() {
    let bytes = request(DumpKind::Rules(AgentTable::Owned), 9);
    let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
    let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
    assert_eq!(kind, 0x0a07);
    assert_eq!(flags, NLM_F_REQUEST | NLM_F_DUMP);
    assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().expect("4")), 9);
}
