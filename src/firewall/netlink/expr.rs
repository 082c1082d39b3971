//! Lowering the ruleset's [`Expr`]s to netlink expressions.
//!
//! The crate types `meta`, `payload`, `cmp`, `bitwise`, `lookup` and `immediate`; `ct`, `fib`,
//! `limit` and `log` are encoded here as raw attributes (numbers from
//! `include/uapi/linux/netfilter/nf_tables.h`, which the crate does not export).

use netlink_packet_core::{DefaultNla, Emitable};
use netlink_packet_netfilter::nftables as nft;

use super::attrs::nlas;
use super::dump::{RawExpr, parse_expressions};
use crate::firewall::ruleset::{Expr, MetaKey};

const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_DIRECTION: u32 = 1;
const NFT_CT_STATUS: u32 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_ADDR_MAX: u16 = 4;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_REG_PROTO_MAX: u16 = 6;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_DNAT: u32 = 1;
/// `NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED`: what the kernel sets (and dumps)
/// for a nat expression with an address and a port, sent as is so the dump compares equal.
const NAT_FLAGS_ADDR_AND_PORT: u32 = 1 | 2;
const NFTA_CT_DIRECTION: u16 = 3;
const NFT_CT_PROTO_DST: u32 = 12;
const IP_CT_DIR_ORIGINAL: u8 = 0;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_OIF: u32 = 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_SADDR: u32 = 1 << 0;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const NFTA_FIB_F_IIF: u32 = 1 << 3;
const NFTA_FIB_F_PRESENT: u32 = 1 << 5;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
const NFTA_LIMIT_FLAGS: u16 = 5;
const NFT_LIMIT_PKTS: u32 = 0;
const NFTA_LOG_GROUP: u16 = 1;
const NFTA_LOG_PREFIX: u16 = 2;
const NFTA_SOCKET_KEY: u16 = 1;
const NFTA_SOCKET_DREG: u16 = 2;
const NFTA_SOCKET_LEVEL: u16 = 3;
const NFT_SOCKET_CGROUPV2: u32 = 3;
const NFTA_BYTEORDER_SREG: u16 = 1;
const NFTA_BYTEORDER_DREG: u16 = 2;
const NFTA_BYTEORDER_OP: u16 = 3;
const NFTA_BYTEORDER_LEN: u16 = 4;
const NFTA_BYTEORDER_SIZE: u16 = 5;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFTA_RANGE_SREG: u16 = 1;
const NFTA_RANGE_OP: u16 = 2;
const NFTA_RANGE_FROM_DATA: u16 = 3;
const NFTA_RANGE_TO_DATA: u16 = 4;
const NFT_RANGE_NEQ: u32 = 1;
/// `NFTA_DATA_VALUE`: the one attribute inside an `nft_data` (a value, not a verdict).
const NFTA_DATA_VALUE: u16 = 1;

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// An `nft_data` value: one nested `NFTA_DATA_VALUE` attribute holding the bytes.
fn data_value(kind: u16, value: &[u8]) -> DefaultNla {
    let inner = DefaultNla::new(NFTA_DATA_VALUE, value.to_vec());
    let mut buf = vec![0; inner.buffer_len()];
    inner.emit(&mut buf);
    DefaultNla::new(kind | netlink_packet_core::NLA_F_NESTED, buf)
}

fn raw(name: &str, attrs: Vec<DefaultNla>) -> nft::Expressions {
    nft::Expressions::Other {
        expression_type: name.to_string(),
        attributes: attrs,
    }
}

fn meta_key(k: MetaKey) -> nft::MetaKey {
    match k {
        MetaKey::Mark => nft::MetaKey::Mark,
        MetaKey::Iif => nft::MetaKey::Iif,
        MetaKey::Oif => nft::MetaKey::Oif,
        MetaKey::NfProto => nft::MetaKey::Nfproto,
        MetaKey::L4Proto => nft::MetaKey::L4Proto,
        MetaKey::SkUid => nft::MetaKey::SocketUserId,
        MetaKey::SkGid => nft::MetaKey::SocketGroupId,
        MetaKey::IifName => nft::MetaKey::Iifname,
        MetaKey::OifName => nft::MetaKey::Oifname,
    }
}

/// One [`Expr`] as an `NFTA_LIST_ELEM` of a rule's expression list.
fn expression(e: &Expr) -> nft::ListAttribute<nft::ExpressionAttribute> {
    let reg1 = nft::Register::Reg1;
    let ex = match e {
        Expr::Meta { key, dreg } => nft::Expressions::Meta(vec![
            nft::Meta::Key(meta_key(*key)),
            nft::Meta::DestinationRegister(nft::Register::from(*dreg)),
        ]),
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => nft::Expressions::Payload(vec![
            nft::Payload::DestinationRegister(nft::Register::from(*dreg)),
            nft::Payload::Base(base.number()),
            nft::Payload::Offset(*offset),
            nft::Payload::Len(*len),
        ]),
        Expr::Cmp { neq, data } => nft::Expressions::Cmp(vec![
            nft::Cmp::SourceRegister(reg1),
            nft::Cmp::Op(if *neq {
                nft::Operator::NotEqual
            } else {
                nft::Operator::Equal
            }),
            nft::Cmp::Data(nft::DataAttribute::Value(data.clone())),
        ]),
        Expr::Bitwise { mask, xor } => nft::Expressions::Bitwise(vec![
            nft::Bitwise::SourceRegister(reg1),
            nft::Bitwise::DestinationRegister(reg1),
            nft::Bitwise::Length(mask.len() as u32),
            nft::Bitwise::Mask(nft::DataAttribute::Value(mask.clone())),
            nft::Bitwise::Xor(nft::DataAttribute::Value(xor.clone())),
        ]),
        Expr::Lookup { set } => nft::Expressions::Lookup(vec![
            nft::Lookup::Set(set.to_string()),
            nft::Lookup::SourceRegister(reg1),
        ]),
        Expr::CtState => raw(
            "ct",
            vec![
                DefaultNla::new(NFTA_CT_KEY, be32(NFT_CT_STATE)),
                DefaultNla::new(NFTA_CT_DREG, be32(1)),
            ],
        ),
        Expr::CtDirection => raw(
            "ct",
            vec![
                DefaultNla::new(NFTA_CT_KEY, be32(NFT_CT_DIRECTION)),
                DefaultNla::new(NFTA_CT_DREG, be32(1)),
            ],
        ),
        Expr::SocketCgroupV2 { level } => raw(
            "socket",
            vec![
                DefaultNla::new(NFTA_SOCKET_KEY, be32(NFT_SOCKET_CGROUPV2)),
                DefaultNla::new(NFTA_SOCKET_DREG, be32(1)),
                DefaultNla::new(NFTA_SOCKET_LEVEL, be32(*level)),
            ],
        ),
        Expr::CtOriginalProtoDst => raw(
            "ct",
            vec![
                DefaultNla::new(NFTA_CT_KEY, be32(NFT_CT_PROTO_DST)),
                DefaultNla::new(NFTA_CT_DIRECTION, vec![IP_CT_DIR_ORIGINAL]),
                DefaultNla::new(NFTA_CT_DREG, be32(1)),
            ],
        ),
        Expr::FibSaddrIifOifPresent => raw(
            "fib",
            vec![
                DefaultNla::new(
                    NFTA_FIB_FLAGS,
                    be32(NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF | NFTA_FIB_F_PRESENT),
                ),
                DefaultNla::new(NFTA_FIB_RESULT, be32(NFT_FIB_RESULT_OIF)),
                DefaultNla::new(NFTA_FIB_DREG, be32(1)),
            ],
        ),
        Expr::FibSaddrType => raw(
            "fib",
            vec![
                DefaultNla::new(NFTA_FIB_FLAGS, be32(NFTA_FIB_F_SADDR)),
                DefaultNla::new(NFTA_FIB_RESULT, be32(NFT_FIB_RESULT_ADDRTYPE)),
                DefaultNla::new(NFTA_FIB_DREG, be32(1)),
            ],
        ),
        Expr::FibDaddrType => raw(
            "fib",
            vec![
                DefaultNla::new(NFTA_FIB_FLAGS, be32(NFTA_FIB_F_DADDR)),
                DefaultNla::new(NFTA_FIB_RESULT, be32(NFT_FIB_RESULT_ADDRTYPE)),
                DefaultNla::new(NFTA_FIB_DREG, be32(1)),
            ],
        ),
        Expr::Limit { rate, burst } => raw(
            "limit",
            vec![
                DefaultNla::new(NFTA_LIMIT_RATE, rate.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_LIMIT_UNIT, 1u64.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_LIMIT_BURST, be32(*burst)),
                DefaultNla::new(NFTA_LIMIT_TYPE, be32(NFT_LIMIT_PKTS)),
                DefaultNla::new(NFTA_LIMIT_FLAGS, be32(0)),
            ],
        ),
        Expr::Log { prefix, group } => {
            let mut p = prefix.as_bytes().to_vec();
            p.push(0);
            let mut attrs = vec![DefaultNla::new(NFTA_LOG_PREFIX, p)];
            if let Some(group) = group {
                attrs.insert(
                    0,
                    DefaultNla::new(NFTA_LOG_GROUP, group.to_be_bytes().to_vec()),
                );
            }
            raw("log", attrs)
        }
        Expr::HostToBig32 => raw(
            "byteorder",
            vec![
                DefaultNla::new(NFTA_BYTEORDER_SREG, be32(1)),
                DefaultNla::new(NFTA_BYTEORDER_DREG, be32(1)),
                DefaultNla::new(NFTA_BYTEORDER_OP, be32(NFT_BYTEORDER_HTON)),
                DefaultNla::new(NFTA_BYTEORDER_LEN, be32(4)),
                DefaultNla::new(NFTA_BYTEORDER_SIZE, be32(4)),
            ],
        ),
        Expr::RangeNeq { from, to } => raw(
            "range",
            vec![
                DefaultNla::new(NFTA_RANGE_SREG, be32(1)),
                DefaultNla::new(NFTA_RANGE_OP, be32(NFT_RANGE_NEQ)),
                data_value(NFTA_RANGE_FROM_DATA, from),
                data_value(NFTA_RANGE_TO_DATA, to),
            ],
        ),
        Expr::CtStatus => raw(
            "ct",
            vec![
                DefaultNla::new(NFTA_CT_KEY, be32(NFT_CT_STATUS)),
                DefaultNla::new(NFTA_CT_DREG, be32(1)),
            ],
        ),
        Expr::Immediate { dreg, data } => nft::Expressions::Immediate(vec![
            nft::Immediate::DestinationRegister(nft::Register::from(*dreg)),
            nft::Immediate::Data(nft::DataAttribute::Value(data.clone())),
        ]),
        Expr::Dnat { family } => raw(
            "nat",
            vec![
                DefaultNla::new(NFTA_NAT_TYPE, be32(NFT_NAT_DNAT)),
                DefaultNla::new(NFTA_NAT_FAMILY, be32(u32::from(family.nfproto()))),
                DefaultNla::new(NFTA_NAT_REG_ADDR_MIN, be32(1)),
                DefaultNla::new(NFTA_NAT_REG_ADDR_MAX, be32(1)),
                DefaultNla::new(NFTA_NAT_REG_PROTO_MIN, be32(2)),
                DefaultNla::new(NFTA_NAT_REG_PROTO_MAX, be32(2)),
                DefaultNla::new(NFTA_NAT_FLAGS, be32(NAT_FLAGS_ADDR_AND_PORT)),
            ],
        ),
        Expr::Verdict(v) => nft::Expressions::Immediate(vec![
            nft::Immediate::DestinationRegister(nft::Register::Verdict),
            nft::Immediate::Data(nft::DataAttribute::Verdict(vec![
                nft::VerdictAttribute::Code(nft::Verdict::Other(v.code())),
            ])),
        ]),
    };
    nft::ListAttribute::from(ex)
}

pub(super) fn rule_expressions(
    exprs: &[Expr],
) -> Vec<nft::ListAttribute<nft::ExpressionAttribute>> {
    exprs.iter().map(expression).collect()
}

/// Our expressions in the same raw form, by serialising them and reading them back.
pub(crate) fn raw_expressions(exprs: &[Expr]) -> Vec<RawExpr> {
    let attr = nft::RuleAttribute::Expressions(rule_expressions(exprs));
    let mut buf = vec![0; attr.buffer_len()];
    attr.emit(&mut buf);
    nlas(&buf)
        .next()
        .map(|(_, v)| parse_expressions(v))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::ruleset::Verdict;

    #[test]
    fn raw_expressions_round_trip() {
        let exprs = vec![
            Expr::CtState,
            Expr::Cmp {
                neq: true,
                data: vec![0; 4],
            },
            Expr::Verdict(Verdict::Accept),
        ];
        let raw = raw_expressions(&exprs);
        assert_eq!(raw.len(), 3);
        assert_eq!(raw[0].name, "ct");
        assert_eq!(raw[2].name, "immediate");
    }
}
