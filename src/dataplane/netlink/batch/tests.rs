use super::*;
use crate::config::Mode;
use crate::dataplane::model;
use crate::policy::ExemptKey;
use std::net::Ipv4Addr;

/// Payloads (nfgenmsg and attributes, after the netlink header) that nft 1.0.6 sent for
/// this ruleset, captured with `nft --debug=mnl -f` on a 6.18 kernel:
///
/// ```text
/// table inet egress_guard {
///   counter rejected_tcp { }  counter rejected_other { }
///   set allowed { type ipv4_addr; flags interval; elements = { 10.0.0.0/8, 172.16.5.0/24 } }
///   set exempt { type iface_index . ipv4_addr; elements = { 12 . 10.255.1.4 } }
///   chain forward { type filter hook forward priority filter - 10; policy accept;
///                   ip saddr 10.255.0.0/16 jump overlay_egress }
///   chain overlay_egress { iif . ip saddr @exempt return
///                          ip daddr @allowed return
///                          meta l4proto tcp counter name "rejected_tcp" reject with tcp reset
///                          counter name "rejected_other" reject with icmpx admin-prohibited }
/// }
/// ```
pub(crate) const NFT_TABLE: &str =
    "01000000110001006567726573735f6775617264000000000800020000000000";
pub(crate) const NFT_CHAIN_FORWARD: &str = "01000000110001006567726573735f6775617264000000000c000300666f7277617264000b00070066696c7465720000080005000000000114000480080001000000000208000200fffffff6";
pub(crate) const NFT_CHAIN_EGRESS: &str =
    "01000000110001006567726573735f677561726400000000130003006f7665726c61795f6567726573730000";
pub(crate) const NFT_COUNTER_TCP: &str = "01000000110001006567726573735f6775617264000000001100020072656a65637465645f7463700000000008000300000000011c0004800c00010000000000000000000c0002000000000000000000";
pub(crate) const NFT_SET_ALLOWED: &str = "01000000110001006567726573735f6775617264000000000c000200616c6c6f7765640008000300000000040800040000000007080005000000000408000a00000000010a000d000004020000000000";
pub(crate) const NFT_ELEMENTS_ALLOWED: &str = "01000000110001006567726573735f6775617264000000000c000200616c6c6f7765640008000400000000016c0003801800018008000300000000010c0001800800010000000000100002800c000180080001000a0000001800038008000300000000010c000180080001000b000000100004800c00018008000100ac1005001800058008000300000000010c00018008000100ac100600";
pub(crate) const NFT_SET_EXEMPT: &str = "01000000110001006567726573735f6775617264000000000b0002006578656d7074000008000300000000000800040000000507080005000000000808000a000000000214000d00000400000000030800040d0000000100";
pub(crate) const NFT_ELEMENTS_EXEMPT: &str = "01000000110001006567726573735f6775617264000000000b0002006578656d7074000008000400000000021800038014000180100001800c0001000c0000000aff0104";
pub(crate) const NFT_RULE_JUMP: &str = "01000000110001006567726573735f6775617264000000000c000200666f727761726400f800048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000022c00018008000100636d700020000280080001000000000108000200000000000c000380060001000aff0000440001800e000100696d6d656469617465000000300002800800010000000000240002802000028008000100fffffffd130002006f7665726c61795f6567726573730000";
pub(crate) const NFT_RULE_EXEMPT: &str = "01000000110001006567726573735f677561726400000000130002006f7665726c61795f65677265737300000c01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000200000024000180090001006d657461000000001400028008000200000000040800010000000001340001800c0001007061796c6f6164002400028008000100000000090800020000000001080003000000000c0800040000000004300001800b0001006c6f6f6b757000002000028008000200000000010b0001006578656d707400000800040000000002300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb";
pub(crate) const NFT_RULE_ALLOWED: &str = "01000000110001006567726573735f677561726400000000130002006f7665726c61795f6567726573730000e800048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f616400240002800800010000000001080002000000000108000300000000100800040000000004300001800b0001006c6f6f6b757000002000028008000200000000010c000100616c6c6f776564000800040000000001300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb";
pub(crate) const NFT_RULE_REJECT_TCP: &str = "01000000110001006567726573735f677561726400000000130002006f7665726c61795f6567726573730000a400048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100060000002c0001800b0001006f626a72656600001c00028008000100000000011000020072656a65637465645f746370240001800b00010072656a65637400001400028008000100000000010500020000000000";
pub(crate) const NFT_RULE_REJECT_OTHER: &str = "01000000110001006567726573735f677561726400000000130002006f7665726c61795f656772657373000058000480300001800b0001006f626a72656600002000028008000100000000011200020072656a65637465645f6f746865720000240001800b00010072656a65637400001400028008000100000000020500020003000000";
/// `counter blocked { }`, `counter blocked_logged { }` and, in `overlay_egress`,
/// `counter name "blocked" update @report_budget { iif limit rate 20/second burst 20 packets }
/// limit rate 200/second burst 100 packets counter name "blocked_logged" log prefix
/// "egress_guard" group 9851` (same capture method, `report_budget` declared sixth:
/// `set report_budget { type iface_index; size 4096; flags dynamic,timeout; timeout 1m; }`,
/// whose creation is NFT_SET_REPORT_BUDGET).
pub(crate) const NFT_COUNTER_BLOCKED: &str = "01000000110001006567726573735f6775617264000000000c000200626c6f636b65640008000300000000011c0004800c00010000000000000000000c0002000000000000000000";
pub(crate) const NFT_COUNTER_LOGGED: &str = "01000000110001006567726573735f67756172640000000013000200626c6f636b65645f6c6f67676564000008000300000000011c0004800c00010000000000000000000c0002000000000000000000";
pub(crate) const NFT_RULE_REPORT: &str = "01000000110001006567726573735f677561726400000000130002006f7665726c61795f656772657373000074010480280001800b0001006f626a72656600001800028008000100000000010b000200626c6f636b65640024000180090001006d657461000000001400028008000200000000040800010000000001840001800b00010064796e73657400007400028008000400000000010800030000000001120001007265706f72745f6275646765740000000800020000000006440007800a0001006c696d6974000000340002800c00010000000000000000140c0002000000000000000001080003000000001408000400000000000800050000000000440001800a0001006c696d6974000000340002800c00010000000000000000c80c0002000000000000000001080003000000006408000400000000000800050000000000300001800b0001006f626a726566000020000280080001000000000112000200626c6f636b65645f6c6f6767656400002c000180080001006c6f670020000280110002006567726573735f67756172640000000006000100267b0000";
/// `ip saddr 10.240.0.0/12 jump overlay_egress` (a prefix that is not byte aligned).
const NFT_RULE_JUMP_MASKED: &str = "01000000110001006567726573735f6775617264000000000c000200666f7277617264003c01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100fff000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c000380080001000af00000440001800e000100696d6d656469617465000000300002800800010000000000240002802000028008000100fffffffd130002006f7665726c61795f6567726573730000";
/// The IPv6 part, captured the same way from:
///
/// ```text
///   counter rejected6_tcp { }  counter rejected6_other { }
///   set allowed6 { type ipv6_addr; flags interval; elements = { fd00::/8, 2001:db8:1::/48 } }
///   set exempt6 { type iface_index . ipv6_addr; elements = { 12 . fd00::5 } }
///   chain forward { … meta nfproto ipv6 meta iifkind "veth" jump overlay6_egress }
///   chain overlay6_egress { iif . ip6 saddr @exempt6 return
///                           ip6 daddr @allowed6 return
///                           ip6 daddr @containers6 return (NFT6_RULE_C2C6, below)
///                           meta l4proto tcp counter name "rejected6_tcp" reject with tcp reset
///                           counter name "rejected6_other" reject with icmpx admin-prohibited }
/// ```
const NFT6_CHAIN_EGRESS6: &str =
    "01000000110001006567726573735f677561726400000000140003006f7665726c6179365f65677265737300";
const NFT6_COUNTER_TCP6: &str = "01000000110001006567726573735f6775617264000000001200020072656a6563746564365f74637000000008000300000000011c0004800c00010000000000000000000c0002000000000000000000";
const NFT6_SET_ALLOWED6: &str = "01000000110001006567726573735f6775617264000000000d000200616c6c6f776564360000000008000300000000040800040000000008080005000000001008000a00000000030a000d000004020000000000";
const NFT6_ELEMENTS_ALLOWED6: &str = "01000000110001006567726573735f6775617264000000000d000200616c6c6f77656436000000000800040000000003a80003802400018008000300000000011800018014000100000000000000000000000000000000001c000280180001801400010020010db8000100000000000000000000240003800800030000000001180001801400010020010db80002000000000000000000001c0004801800018014000100fd0000000000000000000000000000002400058008000300000000011800018014000100fe000000000000000000000000000000";
const NFT6_SET_EXEMPT6: &str = "01000000110001006567726573735f6775617264000000000c0002006578656d7074360008000300000000000800040000000508080005000000001408000a000000000414000d00000400000000030800040d0000000100";
const NFT6_ELEMENTS_EXEMPT6: &str = "01000000110001006567726573735f6775617264000000000c0002006578656d70743600080004000000000424000380200001801c000180180001000c000000fd000000000000000000000000000005";
const NFT6_RULE_JUMP6: &str = "01000000110001006567726573735f6775617264000000000c000200666f727761726400f400048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a00000024000180090001006d6574610000000014000280080002000000001a08000100000000013800018008000100636d70002c00028008000100000000010800020000000000180003801400010076657468000000000000000000000000440001800e000100696d6d656469617465000000300002800800010000000000240002802000028008000100fffffffd140002006f7665726c6179365f65677265737300";
const NFT6_RULE_EXEMPT6: &str = "01000000110001006567726573735f677561726400000000140002006f7665726c6179365f656772657373000c01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a00000024000180090001006d657461000000001400028008000200000000040800010000000001340001800c0001007061796c6f616400240002800800010000000009080002000000000108000300000000080800040000000010300001800b0001006c6f6f6b757000002000028008000200000000010c0001006578656d707436000800040000000004300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb";
const NFT6_RULE_ALLOWED6: &str = "01000000110001006567726573735f677561726400000000140002006f7665726c6179365f65677265737300ec00048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f616400240002800800010000000001080002000000000108000300000000180800040000000010340001800b0001006c6f6f6b757000002400028008000200000000010d000100616c6c6f77656436000000000800040000000003300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb";
/// `ip6 daddr @containers6 return`, with the set `containers6 { type ipv6_addr; elements = {
/// fd00::7 } }` declared fifth (after allowed, exempt, allowed6 and exempt6), captured the
/// same way.
const NFT6_RULE_C2C6: &str = "01000000110001006567726573735f677561726400000000140002006f7665726c6179365f65677265737300ec00048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f616400240002800800010000000001080002000000000108000300000000180800040000000010340001800b0001006c6f6f6b7570000024000280080002000000000110000100636f6e7461696e65727336000800040000000005300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb";
const NFT_SET_REPORT_BUDGET: &str = "01000000110001006567726573735f677561726400000000120002007265706f72745f62756467657400000008000300000000300800040000000014080005000000000408000a00000000060c00098008000100000010000c000b00000000000000ea600a000d000004010000000000";
const NFT6_SET_CONTAINERS6: &str = "01000000110001006567726573735f67756172640000000010000200636f6e7461696e657273360008000300000000000800040000000008080005000000001008000a00000000050a000d000004020000000000";
const NFT6_ELEMENTS_CONTAINERS6: &str = "01000000110001006567726573735f67756172640000000010000200636f6e7461696e65727336000800040000000005200003801c0001801800018014000100fd000000000000000000000000000007";
const NFT6_RULE_REJECT6_TCP: &str = "01000000110001006567726573735f677561726400000000140002006f7665726c6179365f65677265737300a800048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000300001800b0001006f626a72656600002000028008000100000000011100020072656a6563746564365f746370000000240001800b00010072656a65637400001400028008000100000000010500020000000000";
const NFT6_RULE_REJECT6_OTHER: &str = "01000000110001006567726573735f677561726400000000140002006f7665726c6179365f6567726573730058000480300001800b0001006f626a72656600002000028008000100000000011300020072656a6563746564365f6f7468657200240001800b00010072656a65637400001400028008000100000000020500020003000000";
/// The report rule in chain overlay6_egress (the same rule text as in overlay_egress).
const NFT6_RULE_REPORT6: &str = "01000000110001006567726573735f677561726400000000140002006f7665726c6179365f6567726573730074010480280001800b0001006f626a72656600001800028008000100000000010b000200626c6f636b65640024000180090001006d657461000000001400028008000200000000040800010000000001840001800b00010064796e73657400007400028008000400000000010800030000000001120001007265706f72745f6275646765740000000800020000000006440007800a0001006c696d6974000000340002800c00010000000000000000140c0002000000000000000001080003000000001408000400000000000800050000000000440001800a0001006c696d6974000000340002800c00010000000000000000c80c0002000000000000000001080003000000006408000400000000000800050000000000300001800b0001006f626a726566000020000280080001000000000112000200626c6f636b65645f6c6f6767656400002c000180080001006c6f670020000280110002006567726573735f67756172640000000006000100267b0000";
/// The DNS filter's chain and rules (`[dns] enabled`, listener port 9853), captured the same
/// way with the table above plus:
///
/// ```text
///   chain dns_redirect {
///     type nat hook prerouting priority dstnat; policy accept;
///     iif . ip saddr @exempt return
///     ip saddr 10.255.0.0/16 udp dport 53 redirect to :9853
///     ip saddr 10.255.0.0/16 tcp dport 53 redirect to :9853
///   }
/// ```
pub(crate) const NFT_CHAIN_DNS: &str = "01000000110001006567726573735f67756172640000000011000300646e735f726564697265637400000000080007006e617400080005000000000114000480080001000000000008000200ffffff9c";
pub(crate) const NFT_RULE_DNS_EXEMPT: &str = "01000000110001006567726573735f67756172640000000011000200646e735f7265646972656374000000000c01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000200000024000180090001006d657461000000001400028008000200000000040800010000000001340001800c0001007061796c6f6164002400028008000100000000090800020000000001080003000000000c0800040000000004300001800b0001006c6f6f6b757000002000028008000200000000010b0001006578656d707400000800040000000002300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100fffffffb";
pub(crate) const NFT_RULE_DNS_UDP: &str = "01000000110001006567726573735f67756172640000000011000200646e735f726564697265637400000000b401048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000022c00018008000100636d700020000280080001000000000108000200000000000c000380060001000aff000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010011000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c00038006000100003500002c0001800e000100696d6d6564696174650000001800028008000100000000010c00028006000100267d0000240001800a00010072656469720000001400028008000100000000010800030000000002";
pub(crate) const NFT_RULE_DNS_TCP: &str = "01000000110001006567726573735f67756172640000000011000200646e735f726564697265637400000000b401048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000022c00018008000100636d700020000280080001000000000108000200000000000c000380060001000aff000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c00038006000100003500002c0001800e000100696d6d6564696174650000001800028008000100000000010c00028006000100267d0000240001800a00010072656469720000001400028008000100000000010800030000000002";
/// `delete element inet egress_guard exempt { 12 . 10.255.1.4 }`.
const NFT_DELETE_ELEMENT: &str = "01000000110001006567726573735f6775617264000000000b0002006578656d707400001800038014000180100001800c0001000c0000000aff0104";
/// `delete table inet egress_guard`.
const NFT_DELETE_TABLE: &str = "01000000110001006567726573735f677561726400000000";

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// (type, flags, seq, payload hex) of each message in `bytes`.
pub(crate) fn split(bytes: &[u8]) -> Vec<(u16, u16, u32, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2"));
        let flags = u16::from_ne_bytes(rest[6..8].try_into().expect("2"));
        let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4"));
        out.push((kind, flags, seq, hex(&rest[16..len])));
        rest = &rest[len..];
    }
    assert!(rest.is_empty(), "trailing bytes");
    out
}

fn payload_of(op: Op, batch_sets: &[Op]) -> String {
    let mut batch = Batch {
        ops: batch_sets.to_vec(),
    };
    batch.push(op);
    let encoded = batch.encode(0);
    let messages = split(&encoded.bytes);
    // The last message before BATCH_END is the op's (single-message ops only).
    messages[messages.len() - 2].3.clone()
}

fn sets(table: AgentTable) -> Vec<Op> {
    model::sets()
        .into_iter()
        .zip(1..)
        .map(|(set, id)| Op::AddSet { table, set, id })
        .collect()
}

#[test]
fn table_chains_counters_and_sets_are_what_nft_sends() {
    let t = AgentTable::Persistent;
    let [forward, egress, egress6] = model::chains();
    assert_eq!(
        payload_of(
            Op::AddChain {
                table: t,
                chain: egress6
            },
            &[]
        ),
        NFT6_CHAIN_EGRESS6
    );
    assert_eq!(
        payload_of(
            Op::AddTable {
                table: t,
                flags: Some(0)
            },
            &[]
        ),
        NFT_TABLE
    );
    assert_eq!(
        payload_of(
            Op::AddChain {
                table: t,
                chain: forward
            },
            &[]
        ),
        NFT_CHAIN_FORWARD
    );
    assert_eq!(
        payload_of(
            Op::AddChain {
                table: t,
                chain: egress
            },
            &[]
        ),
        NFT_CHAIN_EGRESS
    );
    assert_eq!(
        payload_of(
            Op::AddCounter {
                table: t,
                name: model::COUNTER_TCP
            },
            &[]
        ),
        NFT_COUNTER_TCP
    );
    for (name, golden) in [
        (model::COUNTER_BLOCKED, NFT_COUNTER_BLOCKED),
        (model::COUNTER_LOGGED, NFT_COUNTER_LOGGED),
    ] {
        assert_eq!(payload_of(Op::AddCounter { table: t, name }, &[]), golden);
    }
    let [
        allowed,
        exempt,
        allowed6,
        exempt6,
        containers6,
        report_budget,
    ] = model::sets();
    let set = |set, id| payload_of(Op::AddSet { table: t, set, id }, &[]);
    assert_eq!(set(report_budget, 6), NFT_SET_REPORT_BUDGET);
    assert_eq!(set(allowed6, 3), NFT6_SET_ALLOWED6);
    assert_eq!(set(exempt6, 4), NFT6_SET_EXEMPT6);
    assert_eq!(set(containers6, 5), NFT6_SET_CONTAINERS6);
    let counter = |name| payload_of(Op::AddCounter { table: t, name }, &[]);
    assert_eq!(counter(model::COUNTER6_TCP), NFT6_COUNTER_TCP6);
    assert_eq!(
        payload_of(
            Op::AddSet {
                table: t,
                set: allowed,
                id: 1
            },
            &[]
        ),
        NFT_SET_ALLOWED
    );
    assert_eq!(
        payload_of(
            Op::AddSet {
                table: t,
                set: exempt,
                id: 2
            },
            &[]
        ),
        NFT_SET_EXEMPT
    );
    assert_eq!(payload_of(Op::DeleteTable(t), &[]), NFT_DELETE_TABLE);
}

#[test]
fn elements_are_what_nft_sends() {
    let t = AgentTable::Persistent;
    let allowed = model::interval_elements(&[
        "10.0.0.0/8".parse().expect("literal"),
        "172.16.5.0/24".parse().expect("literal"),
    ]);
    assert_eq!(
        payload_of(
            Op::AddElements {
                table: t,
                set: model::ALLOWED_SET,
                set_id: Some(1),
                elements: allowed
            },
            &[]
        ),
        NFT_ELEMENTS_ALLOWED
    );
    let key = model::exempt_element(&ExemptKey {
        ifindex: 12,
        ip: Ipv4Addr::new(10, 255, 1, 4),
    });
    assert_eq!(
        payload_of(
            Op::AddElements {
                table: t,
                set: model::EXEMPT_SET,
                set_id: Some(2),
                elements: vec![key.clone()]
            },
            &[]
        ),
        NFT_ELEMENTS_EXEMPT
    );
    assert_eq!(
        payload_of(
            Op::DeleteElements {
                table: t,
                set: model::EXEMPT_SET,
                elements: vec![key]
            },
            &[]
        ),
        NFT_DELETE_ELEMENT
    );
    let allowed6 = model::interval_elements6(&[
        "fd00::/8".parse().expect("literal"),
        "2001:db8:1::/48".parse().expect("literal"),
    ]);
    assert_eq!(
        payload_of(
            Op::AddElements {
                table: t,
                set: model::ALLOWED6_SET,
                set_id: Some(3),
                elements: allowed6
            },
            &[]
        ),
        NFT6_ELEMENTS_ALLOWED6
    );
    let key6 = model::exempt6_element(&crate::policy::Exempt6Key {
        ifindex: 12,
        ip: "fd00::5".parse().expect("literal"),
    });
    assert_eq!(
        payload_of(
            Op::AddElements {
                table: t,
                set: model::EXEMPT6_SET,
                set_id: Some(4),
                elements: vec![key6]
            },
            &[]
        ),
        NFT6_ELEMENTS_EXEMPT6
    );
    let container6 = model::container6_element(&"fd00::7".parse().expect("literal"));
    assert_eq!(
        model::container6_address(&container6),
        Some("fd00::7".parse().expect("literal"))
    );
    assert_eq!(
        payload_of(
            Op::AddElements {
                table: t,
                set: model::CONTAINERS6_SET,
                set_id: Some(5),
                elements: vec![container6]
            },
            &[]
        ),
        NFT6_ELEMENTS_CONTAINERS6
    );
}

#[test]
fn rules_are_the_bytecode_nft_emits() {
    let t = AgentTable::Persistent;
    let overlay = "10.255.0.0/16".parse().expect("literal");
    let enforce = model::rules(t, overlay, Mode::Enforce);
    let expected = [
        NFT_RULE_JUMP,
        NFT_RULE_EXEMPT,
        NFT_RULE_ALLOWED,
        NFT_RULE_REPORT,
        NFT_RULE_REJECT_TCP,
        NFT_RULE_REJECT_OTHER,
        NFT6_RULE_JUMP6,
        NFT6_RULE_EXEMPT6,
        NFT6_RULE_ALLOWED6,
        NFT6_RULE_C2C6,
        NFT6_RULE_REPORT6,
        NFT6_RULE_REJECT6_TCP,
        NFT6_RULE_REJECT6_OTHER,
    ];
    // Audit: the same rules without the rejects of each family.
    let audit = model::rules(t, overlay, Mode::Audit);
    let audit_expected: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|g| {
            ![
                NFT_RULE_REJECT_TCP,
                NFT_RULE_REJECT_OTHER,
                NFT6_RULE_REJECT6_TCP,
                NFT6_RULE_REJECT6_OTHER,
            ]
            .contains(g)
        })
        .collect();
    for (rules, expected) in [(enforce, &expected[..]), (audit, &audit_expected[..])] {
        assert_eq!(rules.len(), expected.len());
        for (rule, expected) in rules.into_iter().zip(expected) {
            let chain = rule.chain.clone();
            assert_eq!(
                payload_of(Op::AddRule { table: t, rule }, &sets(t)),
                *expected,
                "rule in {chain}"
            );
        }
    }
    let masked = model::rules(t, "10.240.0.0/12".parse().expect("literal"), Mode::Enforce);
    assert_eq!(
        payload_of(
            Op::AddRule {
                table: t,
                rule: masked[0].clone()
            },
            &[]
        ),
        NFT_RULE_JUMP_MASKED
    );
}

#[test]
fn dns_chain_and_rules_are_the_bytecode_nft_emits() {
    let t = AgentTable::Persistent;
    let [chain] = model::dns_chains();
    assert_eq!(
        payload_of(Op::AddChain { table: t, chain }, &[]),
        NFT_CHAIN_DNS
    );
    let rules = model::dns_rules("10.255.0.0/16".parse().expect("literal"), 9853);
    let expected = [NFT_RULE_DNS_EXEMPT, NFT_RULE_DNS_UDP, NFT_RULE_DNS_TCP];
    assert_eq!(rules.len(), expected.len());
    for (rule, expected) in rules.into_iter().zip(expected) {
        assert_eq!(
            payload_of(Op::AddRule { table: t, rule }, &sets(t)),
            expected
        );
    }
}

#[test]
fn dns_rules_come_after_the_egress_rules_only_when_enabled() {
    let t = AgentTable::Owned;
    let mut desired = crate::policy::DesiredRules {
        overlay: "10.255.0.0/16".parse().expect("literal"),
        allowed: vec!["10.0.0.0/8".parse().expect("literal")],
        exempt: Default::default(),
        dns_redirect: None,
        allowed6: Vec::new(),
        exempt6: Default::default(),
        containers6: Default::default(),
        mode: Mode::Enforce,
    };
    let count = |batch: &Batch| {
        batch
            .ops
            .iter()
            .filter(|op| matches!(op, Op::AddChain { .. } | Op::AddRule { .. }))
            .count()
    };
    let without = crate::dataplane::plan::create(t, &desired);
    // 3 chains, 13 rules (IPv4 and IPv6, with the report rules).
    assert_eq!(count(&without), 3 + 13);
    desired.dns_redirect = Some(9853);
    let with = crate::dataplane::plan::create(t, &desired);
    assert_eq!(count(&with), 3 + 13 + 1 + 3);
    let last_rule = with.ops.iter().rev().find_map(|op| match op {
        Op::AddRule { rule, .. } => Some(rule.chain.clone()),
        _ => None,
    });
    assert_eq!(last_rule.as_deref(), Some(model::DNS_CHAIN));
}

#[test]
fn a_batch_is_framed_and_numbered() {
    let mut batch = Batch::default();
    batch.push(Op::AddTable {
        table: AgentTable::Owned,
        flags: Some(model::TABLE_F_OWNER),
    });
    batch.push(Op::AddElements {
        table: AgentTable::Owned,
        set: model::EXEMPT_SET,
        set_id: None,
        elements: (0..(ELEMENTS_PER_MESSAGE as u32 + 1))
            .map(|i| {
                model::exempt_element(&ExemptKey {
                    ifindex: i,
                    ip: Ipv4Addr::from(i),
                })
            })
            .collect(),
    });
    let encoded = batch.encode(100);
    let messages = split(&encoded.bytes);
    // BEGIN, table, two element messages (split), END.
    assert_eq!(messages.len(), 5);
    assert_eq!((messages[0].0, messages[0].3.as_str()), (0x10, "0000000a"));
    assert_eq!((messages[4].0, messages[4].3.as_str()), (0x11, "0000000a"));
    assert_eq!(messages[1].0, 0x0a00);
    assert_eq!(messages[2].0, 0x0a0c);
    // Owner flag in the table message.
    assert!(
        messages[1].3.ends_with("0800020000000002"),
        "{}",
        messages[1].3
    );
    let seqs: Vec<u32> = messages.iter().map(|m| m.2).collect();
    assert_eq!(seqs, vec![100, 101, 102, 103, 104]);
    assert_eq!(encoded.acked, vec![(101, 0), (102, 1), (103, 1)]);
    for (_, flags, _, _) in &messages[1..4] {
        assert_eq!(
            flags & (NLM_F_REQUEST | NLM_F_ACK),
            NLM_F_REQUEST | NLM_F_ACK
        );
    }
    assert!(batch.creates_owned_table());
    assert!(batch.without(AgentTable::Owned).is_empty());
}

#[test]
fn rules_are_appended_in_order() {
    let t = AgentTable::Persistent;
    let encoded = crate::dataplane::plan::create(
        t,
        &crate::policy::DesiredRules {
            allowed6: Vec::new(),
            exempt6: Default::default(),
            containers6: Default::default(),
            overlay: "10.255.0.0/16".parse().expect("literal"),
            allowed: vec!["10.0.0.0/8".parse().expect("literal")],
            exempt: Default::default(),
            mode: Default::default(),
            dns_redirect: None,
        },
    )
    .encode(1);
    let rules: Vec<u16> = split(&encoded.bytes)
        .into_iter()
        .filter(|m| m.0 == 0x0a06)
        .map(|m| m.1)
        .collect();
    assert_eq!(rules.len(), 13);
    for flags in rules {
        assert_eq!(
            flags & NLM_F_APPEND,
            NLM_F_APPEND,
            "without APPEND the kernel prepends"
        );
    }
}
