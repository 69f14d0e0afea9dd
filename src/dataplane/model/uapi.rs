//! Constants of the kernel's nf_tables ABI (linux/netfilter/nf_tables.h, nf_tables.h's
//! registers, meta keys, payload bases, verdicts, data types) and the set userdata nft writes.

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
/// `NFT_SET_MAP`: elements carry data (for the agent's maps, a verdict).
pub const SET_F_MAP: u32 = 0x8;
/// `NFT_DATA_VERDICT`: a map's data type when its values are verdicts.
pub const DATA_VERDICT: u32 = 0xffff_ff00;
/// `NFT_SET_TIMEOUT` and `NFT_SET_EVAL` (nft's `flags dynamic,timeout`): elements added and
/// updated from the packet path, each expiring after the set's timeout.
pub const SET_F_TIMEOUT: u32 = 0x10;
pub const SET_F_EVAL: u32 = 0x20;
/// `NFT_SET_ELEM_INTERVAL_END`.
pub const ELEM_F_INTERVAL_END: u32 = 0x1;

/// nf_tables registers (`enum nft_registers`): the verdict register, and the 32-bit registers
/// nft uses (reg 1 is the first 128-bit register, which nft calls "reg 1"; reg 9 the second
/// 32-bit slot of it, used for the second half of a concatenation).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG32_01: u32 = 9;

/// `enum nft_meta_keys` values the rules use.
pub const META_IIF: u32 = 4;
/// `NFT_META_OIF`.
pub const META_OIF: u32 = 5;
/// The kind of the input and output interface ("veth", "vxlan", …).
pub const META_IIFKIND: u32 = 26;
pub const META_OIFKIND: u32 = 27;
/// Interface kinds compare as IFNAMSIZ-byte strings, as nft pads them.
pub(super) const IFNAMSIZ: usize = 16;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;
/// `enum nft_payload_bases`: the network header.
pub const PAYLOAD_NETWORK: u32 = 1;
/// `enum nft_cmp_ops`: equality.
pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;
/// `NFT_CMP_LTE` and `NFT_CMP_GTE`: nft compiles a range `a-b` to the pair.
pub const CMP_LTE: u32 = 3;
pub const CMP_GTE: u32 = 5;
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
/// `NF_DROP`, as an immediate verdict.
pub const NF_DROP: i32 = 0;
/// `NFT_LOOKUP_F_INV`: the lookup matches when the key is NOT in the set.
pub const LOOKUP_F_INV: u32 = 0x1;
/// `NFT_LIMIT_F_INV`: `limit rate over`, matching what exceeds the rate.
pub const LIMIT_F_INV: u32 = 0x1;
/// `NF_IP_PRI_RAW`: before conntrack (-200), so a dropped packet never creates an entry.
pub const RAW_PRIORITY: i32 = -300;
/// TCP's flags byte and the SYN and ACK bits.
pub const TCP_FLAGS_OFFSET: u32 = 13;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const NFT_JUMP: i32 = -3;
pub const NFT_RETURN: i32 = -5;
/// `NF_INET_FORWARD`.
pub const HOOK_FORWARD: u32 = 2;
/// `NF_INET_LOCAL_OUT`.
pub const HOOK_OUTPUT: u32 = 3;

/// nft's datatype numbers for set keys (nftables `enum datatypes`): `ipv4_addr`,
/// `ipv6_addr` and `iface_index`; a concatenation packs them 6 bits apart (`TYPE_BITS`).
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IP6ADDR: u32 = 8;
pub const TYPE_IFINDEX: u32 = 20;
pub const CONCAT_TYPE_BITS: u32 = 6;

/// Set userdata nft writes (libnftnl `NFTNL_UDATA_SET_*` TLVs), which `nft list` needs to
/// print elements in their types' notation:
/// - `ipv4_addr` key: key byte order big endian (type 0, len 4, value 2);
pub(super) const USERDATA_IPV4_KEY: [u8; 6] = [0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
/// - `iface_index` key: key byte order host (value 1).
pub(super) const USERDATA_HOST_ORDER_KEY: [u8; 6] = [0x00, 0x04, 0x01, 0x00, 0x00, 0x00];
/// - `iface_index . ipv4_addr`: key byte order unset (0), then the key's "typeof" description
///   (type 3) that nft writes for a concatenation: expression type 13 (concat), no data.
pub(super) const USERDATA_IFINDEX_IPV4_KEY: [u8; 16] = [
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00,
];
/// - `iface_index : verdict` map: key byte order host (type 0, value 1), data byte order unset
///   (type 1, value 0), and type 6 (`NFTNL_UDATA_SET_DATA_TYPEOF`'s neighbour nft 1.0.6 writes
///   for a verdict map), value 0: as captured from `nft --debug=mnl`.
pub(super) const USERDATA_VERDICT_MAP: [u8; 18] = [
    0x00, 0x04, 0x01, 0x00, 0x00, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x06, 0x04, 0x00, 0x00,
    0x00, 0x00,
];

/// `enum nft_ct_keys`: the connection's state bits and its mark.
pub const CT_STATE: u32 = 0;
pub const CT_MARK: u32 = 3;
/// `NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED)`.
pub const CT_STATE_ESTABLISHED_RELATED: u32 = 0x6;
/// `NFT_SET_ELEM_*` attributes the learned maps add: an element's timeout and, read back, the
/// time it has left (both in milliseconds, big endian).
pub const SET_ELEM_TIMEOUT: u16 = 4;
pub const SET_ELEM_EXPIRATION: u16 = 5;
