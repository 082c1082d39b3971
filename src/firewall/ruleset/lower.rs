//! Lowering rules to netlink expressions, in the order and encoding `nft` itself produces for
//! the same text (`nft --debug=netlink`).

use std::net::IpAddr;

use ipnet::IpNet;

use super::model::{
    Family, IdRange, LOG_BURST, LOG_PREFIX, LOG_RATE_PER_SECOND, Match, Rule, Verdict,
};

impl Rule {
    /// The rule as netlink expressions, in order.
    pub(crate) fn exprs(&self) -> Vec<Expr> {
        let mut out = Vec::new();
        let mut family = None;
        for m in &self.matches {
            m.lower(&mut out, &mut family);
        }
        if let Some(v) = self.verdict {
            out.push(Expr::Verdict(v));
        }
        if let Some(to) = self.dnat {
            // As nft: the address in register 1, the port in register 2, then the nat
            // expression naming both (min = max: one address, one port).
            out.push(Expr::Immediate {
                dreg: REG1,
                data: octets(to.ip()),
            });
            out.push(Expr::Immediate {
                dreg: REG2,
                data: to.port().to_be_bytes().to_vec(),
            });
            out.push(Expr::Dnat {
                family: Family::of(to.ip()),
            });
        }
        out
    }
}

/// Registers: `1` is the first 16-byte register, `2` the second; `9` is the second 4-byte
/// register (NFT_REG32_01), right after the first 4 bytes of register 1.
pub(crate) const REG1: u32 = 1;
pub(crate) const REG2: u32 = 2;
const REG32_01: u32 = 9;

/// `meta` keys used here (`enum nft_meta_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKey {
    Mark,
    Iif,
    Oif,
    NfProto,
    L4Proto,
    SkUid,
    SkGid,
    IifName,
    OifName,
}

/// `payload` bases (`enum nft_payload_bases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadBase {
    /// The Ethernet header (`ether type` in the `bridge` family).
    LinkLayer,
    Network,
    Transport,
}

impl PayloadBase {
    pub(crate) fn number(self) -> u32 {
        match self {
            PayloadBase::LinkLayer => 0,
            PayloadBase::Network => 1,
            PayloadBase::Transport => 2,
        }
    }
}

/// One netlink expression, as `nft --debug=netlink` prints them. Data is in the byte order the
/// kernel compares: addresses and ports big-endian, meta values (mark, ifindex) host order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    /// `[ meta load <key> => reg 1 ]`
    Meta { key: MetaKey, dreg: u32 },
    /// `[ payload load <len>b @ <base> header + <offset> => reg <dreg> ]`
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `[ cmp eq|neq reg 1 <data> ]`
    Cmp { neq: bool, data: Vec<u8> },
    /// `[ byteorder reg 1 = hton(reg 1, 4, 4) ]`
    HostToBig32,
    /// `[ range neq reg 1 <from> <to> ]` (inclusive, compared as big-endian bytes)
    RangeNeq { from: Vec<u8>, to: Vec<u8> },
    /// `[ bitwise reg 1 = ( reg 1 & <mask> ) ^ <xor> ]`
    Bitwise { mask: Vec<u8>, xor: Vec<u8> },
    /// `[ lookup reg 1 set <set> ]`
    Lookup { set: &'static str },
    /// `[ ct load state => reg 1 ]`
    CtState,
    /// `[ ct load direction => reg 1 ]`
    CtDirection,
    /// `[ socket load cgroupv2 => reg 1 , level N ]`
    SocketCgroupV2 { level: u32 },
    /// `[ ct load proto_dst => reg 1 , dir original ]`
    CtOriginalProtoDst,
    /// `[ fib saddr . iif oif present => reg 1 ]`
    FibSaddrIifOifPresent,
    /// `[ fib saddr type => reg 1 ]`: the route type of the source (`RTN_*`, host order).
    FibSaddrType,
    /// `[ fib daddr type => reg 1 ]`
    FibDaddrType,
    /// `[ limit rate N/second burst 5 type packets flags 0x0 ]`
    Limit { rate: u64, burst: u32 },
    /// `[ log prefix … ]`, `[ log prefix … group N ]`
    Log {
        prefix: &'static str,
        group: Option<u16>,
    },
    /// `[ immediate reg 0 accept|drop ]`
    Verdict(Verdict),
    /// `[ immediate reg N <data> ]`
    Immediate { dreg: u32, data: Vec<u8> },
    /// `[ nat dnat ip|ip6 addr_min reg 1 proto_min reg 2 ]`
    Dnat { family: Family },
    /// `[ ct load status => reg 1 ]`
    CtStatus,
}

fn cmp_neq(data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        neq: true,
        data: data.into(),
    }
}

/// An interface name as `meta iifname` compares it: the whole `IFNAMSIZ` (16) bytes padded
/// with NUL, or for `prefix*` only the prefix's bytes.
pub(super) fn ifname_data(name: &str) -> Vec<u8> {
    match name.strip_suffix('*') {
        Some(prefix) => prefix.as_bytes().to_vec(),
        None => {
            let mut data = name.as_bytes().to_vec();
            data.resize(16, 0);
            data
        }
    }
}

/// An address or prefix compared for (in)equality, as nft encodes it: the prefix bytes only
/// when the prefix is byte-aligned, else the whole address masked.
fn net_cmp(out: &mut Vec<Expr>, offset: u32, net: &IpNet, neq: bool) {
    let f = Family::of(net.addr());
    let prefix = u32::from(net.prefix_len());
    if prefix > 0 && prefix % 8 == 0 {
        let len = prefix / 8;
        out.push(network(offset, len, REG1));
        let mut data = octets(net.addr());
        data.truncate(len as usize);
        out.push(Expr::Cmp { neq, data });
    } else {
        out.push(network(offset, f.addr_len(), REG1));
        let mask = mask_octets(net);
        let xor = vec![0; mask.len()];
        out.push(Expr::Bitwise { mask, xor });
        out.push(Expr::Cmp {
            neq,
            data: octets(net.network()),
        });
    }
}

/// `meta skuid != FIRST-LAST` as nft encodes it: the id is host order, the range
/// expression compares bytes, so the id is turned big-endian first.
fn id_range_neq(out: &mut Vec<Expr>, key: MetaKey, r: IdRange) {
    out.push(meta(key));
    out.push(Expr::HostToBig32);
    out.push(Expr::RangeNeq {
        from: r.first.to_be_bytes().to_vec(),
        to: r.last.to_be_bytes().to_vec(),
    });
}

fn cmp_eq(data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        neq: false,
        data: data.into(),
    }
}

fn meta(key: MetaKey) -> Expr {
    Expr::Meta { key, dreg: REG1 }
}

fn network(offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len,
        dreg,
    }
}

pub(super) fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub(super) fn mask_octets(net: &IpNet) -> Vec<u8> {
    match net {
        IpNet::V4(n) => n.netmask().octets().to_vec(),
        IpNet::V6(n) => n.netmask().octets().to_vec(),
    }
}

/// The `meta nfproto` check an address load depends on, unless the rule already made it.
fn depend(out: &mut Vec<Expr>, known: &mut Option<Family>, f: Family) {
    if *known != Some(f) {
        out.push(meta(MetaKey::NfProto));
        out.push(cmp_eq([f.nfproto()]));
        *known = Some(f);
    }
}

/// `RTN_LOCAL`: the route type of an address of this host.
const RTN_LOCAL: u32 = 2;

/// `ct status` bit `IPS_DST_NAT`.
const CT_STATUS_DST_NAT: u32 = 1 << 5;

/// `ct state` bits: established (2) and related (4).
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;

impl Match {
    /// `known` is the IP family an earlier match of the rule already checked: like nft, a
    /// later address match then loads the address without checking `meta nfproto` again.
    pub(super) fn lower(&self, out: &mut Vec<Expr>, known: &mut Option<Family>) {
        match self {
            Match::Mark(m) => {
                out.push(meta(MetaKey::Mark));
                out.push(cmp_eq(m.to_ne_bytes()));
            }
            Match::OifLo => {
                out.push(meta(MetaKey::Oif));
                out.push(cmp_eq(1u32.to_ne_bytes()));
            }
            Match::IifLo => {
                out.push(meta(MetaKey::Iif));
                out.push(cmp_eq(1u32.to_ne_bytes()));
            }
            Match::NfProto(f) => {
                out.push(meta(MetaKey::NfProto));
                out.push(cmp_eq([f.nfproto()]));
                // nft counts an explicit family check as the dependency of later addresses.
                *known = Some(*f);
            }
            Match::Daddr(net) => {
                let f = Family::of(net.addr());
                depend(out, known, f);
                net_cmp(out, f.daddr_offset(), net, false);
            }
            Match::SaddrNotIn(net) => {
                let f = Family::of(net.addr());
                depend(out, known, f);
                net_cmp(out, f.saddr_offset(), net, true);
            }
            Match::DaddrNotIn(net) => {
                let f = Family::of(net.addr());
                depend(out, known, f);
                net_cmp(out, f.daddr_offset(), net, true);
            }
            Match::SkUidNot(u) => {
                out.push(meta(MetaKey::SkUid));
                out.push(cmp_neq(u.to_ne_bytes()));
            }
            Match::SkGidNot(g) => {
                out.push(meta(MetaKey::SkGid));
                out.push(cmp_neq(g.to_ne_bytes()));
            }
            Match::SkUidNotIn(r) => id_range_neq(out, MetaKey::SkUid, *r),
            Match::SkGidNotIn(r) => id_range_neq(out, MetaKey::SkGid, *r),
            Match::CgroupOutside { level } => {
                out.push(Expr::SocketCgroupV2 { level: *level });
                out.push(Expr::Lookup {
                    set: super::model::cgroup_set_name(*level),
                });
            }
            Match::IifNameNot(name) => {
                out.push(meta(MetaKey::IifName));
                out.push(cmp_neq(ifname_data(name)));
            }
            Match::OifNameNot(name) => {
                out.push(meta(MetaKey::OifName));
                out.push(cmp_neq(ifname_data(name)));
            }
            Match::Saddr(ip) => {
                let f = Family::of(*ip);
                depend(out, known, f);
                out.push(network(f.saddr_offset(), f.addr_len(), REG1));
                out.push(cmp_eq(octets(*ip)));
            }
            Match::Dport(p, port) | Match::Sport(p, port) => {
                out.push(meta(MetaKey::L4Proto));
                out.push(cmp_eq([p.number()]));
                out.push(Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: if matches!(self, Match::Sport(..)) {
                        0
                    } else {
                        2
                    },
                    len: 2,
                    dreg: REG1,
                });
                out.push(cmp_eq(port.to_be_bytes()));
            }
            Match::HopLimit255 => {
                out.push(network(7, 1, REG1));
                out.push(cmp_eq([255u8]));
            }
            Match::CtDirectionReply => {
                out.push(Expr::CtDirection);
                out.push(cmp_eq([1u8]));
            }
            Match::CtDirectionOriginal => {
                out.push(Expr::CtDirection);
                out.push(cmp_eq([0u8]));
            }
            Match::OpenedToPort(p, port) => {
                out.push(Expr::CtDirection);
                out.push(cmp_eq([0u8]));
                out.push(meta(MetaKey::L4Proto));
                out.push(cmp_eq([p.number()]));
                out.push(Expr::CtOriginalProtoDst);
                out.push(cmp_eq(port.to_be_bytes()));
            }
            Match::SkUidNotRoot => {
                out.push(meta(MetaKey::SkUid));
                out.push(Expr::Cmp {
                    neq: true,
                    data: 0u32.to_ne_bytes().to_vec(),
                });
            }
            Match::CtEstablishedRelated => {
                out.push(Expr::CtState);
                out.push(Expr::Bitwise {
                    mask: CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Expr::Cmp {
                    neq: true,
                    data: vec![0; 4],
                });
            }
            Match::AllowSet { family, per_client } => {
                depend(out, known, *family);
                let len = family.addr_len();
                if *per_client {
                    out.push(network(family.saddr_offset(), len, REG1));
                    let second = match family {
                        Family::V4 => REG32_01,
                        Family::V6 => REG2,
                    };
                    out.push(network(family.daddr_offset(), len, second));
                } else {
                    out.push(network(family.daddr_offset(), len, REG1));
                }
                out.push(Expr::Lookup {
                    set: family.set_name(),
                });
            }
            Match::FibSaddrIifOifMissing => {
                out.push(Expr::FibSaddrIifOifPresent);
                out.push(cmp_eq([0u8; 4]));
            }
            Match::FibDaddrLocal => {
                out.push(Expr::FibDaddrType);
                out.push(cmp_eq(RTN_LOCAL.to_ne_bytes()));
            }
            Match::FibSaddrNotLocal => {
                out.push(Expr::FibSaddrType);
                out.push(cmp_neq(RTN_LOCAL.to_ne_bytes()));
            }
            Match::Icmpv6(t) => {
                depend(out, known, Family::V6);
                out.push(meta(MetaKey::L4Proto));
                out.push(cmp_eq([58u8]));
                out.push(Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: 0,
                    len: 1,
                    dreg: REG1,
                });
                out.push(cmp_eq([t.number()]));
            }
            Match::CtStatusDnat => {
                out.push(Expr::CtStatus);
                out.push(Expr::Bitwise {
                    mask: CT_STATUS_DST_NAT.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Expr::Cmp {
                    neq: true,
                    data: vec![0; 4],
                });
            }
            Match::Limit => out.push(Expr::Limit {
                rate: LOG_RATE_PER_SECOND,
                burst: LOG_BURST,
            }),
            Match::Log(group) => out.push(Expr::Log {
                prefix: LOG_PREFIX,
                group: *group,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_matches_nft() {
        let r = Rule {
            matches: vec![Match::Daddr("10.1.2.0/23".parse().unwrap())],
            verdict: Some(Verdict::Accept),
            dnat: None,
        };
        let e = r.exprs();
        assert_eq!(e.len(), 6);
        assert_eq!(
            e[3],
            Expr::Bitwise {
                mask: vec![255, 255, 254, 0],
                xor: vec![0; 4]
            }
        );
        let r = Rule {
            matches: vec![Match::Daddr("10.0.0.0/8".parse().unwrap())],
            verdict: None,
            dnat: None,
        };
        assert_eq!(r.exprs()[2], network(16, 1, REG1));
        assert_eq!(r.exprs()[3], cmp_eq([10u8]));
    }
}
