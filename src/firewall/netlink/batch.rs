//! Encoding one nf_tables transaction: `BATCH_BEGIN`, the messages, `BATCH_END`.
//!
//! Each message gets its own sequence number and `NLM_F_ACK`, and [`Batch`] remembers which
//! [`Op`] each number stands for, so that an error names the rule or set it concerns.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::nftables as nft;
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use super::error::Op;
use super::expr::rule_expressions;
use super::nftables_subsys;
use crate::firewall::ruleset::{CgroupSetDef, Chain, Expr, Layout, SetDef};

/// Elements per `NEWSETELEM` message (the element list's length field is 16 bits; the largest
/// element, an IPv6 pair with its timeout, takes 56 bytes).
pub(crate) const MAX_ELEMS_PER_MESSAGE: usize = 1000;

/// One element to add: key bytes and timeout in milliseconds (never 0).
pub(crate) struct Elem<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) timeout_ms: u64,
}

/// Whether an element message adds or deletes.
#[derive(Debug, Clone, Copy)]
enum ElemChange {
    Add,
    Delete,
}

/// An element named by its key alone (no timeout: cgroup ids, and every deletion).
fn key_only(key: &[u8]) -> Vec<nft::SetElementAttribute> {
    vec![nft::SetElementAttribute::Key(nft::DataAttribute::Value(
        key.to_vec(),
    ))]
}

/// An nf_tables batch under construction.
pub(crate) struct Batch {
    pub(super) buf: Vec<u8>,
    pub(super) table: String,
    pub(super) first_seq: u32,
    pub(super) next_seq: u32,
    pub(super) ops: Vec<(u32, Op)>,
    /// The family of the table the next messages concern (one transaction may change tables
    /// of both families: the main `inet` table and its `bridge` companion).
    pub(super) family: TableFamily,
}

/// The nf_tables family of a table dnsfence owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableFamily {
    /// `table inet <name>`: the main table.
    Inet,
    /// `table bridge <name>`: the source bindings of bridge ports (`firewall.bind`).
    Bridge,
}

impl TableFamily {
    fn proto(self) -> NetfilterProtoFamily {
        match self {
            TableFamily::Inet => NetfilterProtoFamily::Inet,
            TableFamily::Bridge => NetfilterProtoFamily::Bridge,
        }
    }
}

pub(super) fn nft_message(
    inner: nft::NfTablesMessage,
    flags: u16,
    seq: u32,
    family: TableFamily,
) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let msg = NetfilterMessage::new(NetfilterHeader::new(family.proto(), 0, 0), inner);
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    m
}

pub(super) fn control_message(inner: ControlMessage, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let msg = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, nftables_subsys()),
        inner,
    );
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    m
}

pub(super) fn append(buf: &mut Vec<u8>, m: &NetlinkMessage<NetfilterMessage>) {
    let start = buf.len();
    buf.resize(start + m.buffer_len(), 0);
    if let Some(dst) = buf.get_mut(start..) {
        m.serialize(dst);
    }
}

impl Batch {
    fn push(&mut self, inner: nft::NfTablesMessage, flags: u16, op: Op) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        append(
            &mut self.buf,
            &nft_message(inner, NLM_F_REQUEST | NLM_F_ACK | flags, seq, self.family),
        );
        let op = match self.family {
            TableFamily::Inet => op,
            TableFamily::Bridge => Op::Bridge(Box::new(op)),
        };
        self.ops.push((seq, op));
    }

    /// The messages added from now on concern `table <family> <name>` (same name).
    pub(crate) fn switch_family(&mut self, family: TableFamily) {
        self.family = family;
    }

    /// A filter base chain of the bridge family (`type filter hook <hook> priority
    /// <priority>; policy accept;`): the bridge hooks are numbered like the inet ones.
    pub(crate) fn add_bridge_chain(
        &mut self,
        name: &'static str,
        hook: crate::firewall::ruleset::ChainHook,
        priority: i32,
    ) {
        let inner = nft::NfTablesMessage::NewChain(nft::ChainMessage {
            attributes: vec![
                nft::ChainAttribute::Table(self.table.clone()),
                nft::ChainAttribute::Name(name.to_string()),
                nft::ChainAttribute::Hook(vec![
                    nft::Hook::Number(nft::HookNumber::Inet(nft::InetHookNumber::from(
                        super::hook_number(hook),
                    ))),
                    nft::Hook::Priority(priority as u32),
                ]),
                nft::ChainAttribute::Policy(crate::firewall::ruleset::Verdict::Accept.code()),
                nft::ChainAttribute::Type("filter".to_string()),
            ],
        });
        self.push(inner, NLM_F_CREATE | NLM_F_EXCL, Op::NewChain(name));
    }

    /// Number of messages in the batch.
    pub(crate) fn len(&self) -> usize {
        self.ops.len()
    }

    pub(crate) fn add_table(&mut self) {
        let inner = nft::NfTablesMessage::NewTable(nft::TableMessage {
            attributes: vec![nft::TableAttribute::Name(self.table.clone())],
        });
        self.push(inner, NLM_F_CREATE | NLM_F_EXCL, Op::NewTable);
    }

    pub(crate) fn del_table(&mut self) {
        let inner = nft::NfTablesMessage::DeleteTable(nft::TableMessage {
            attributes: vec![nft::TableAttribute::Name(self.table.clone())],
        });
        self.push(inner, 0, Op::DelTable);
    }

    pub(crate) fn add_set(&mut self, set: &SetDef, id: u32) {
        let inner = nft::NfTablesMessage::NewSet(nft::SetMessage {
            attributes: vec![
                nft::SetAttribute::Table(self.table.clone()),
                nft::SetAttribute::Name(set.name().to_string()),
                nft::SetAttribute::Flags(nft::SetFlags::Timeout),
                nft::SetAttribute::KeyType(set.key_type()),
                nft::SetAttribute::KeyLen(set.key_len()),
                nft::SetAttribute::Id(id),
                nft::SetAttribute::Description(vec![nft::SetDescription::Size(set.size)]),
            ],
        });
        self.push(inner, NLM_F_CREATE | NLM_F_EXCL, Op::NewSet(set.name()));
    }

    /// A set of cgroup ids (no timeout: the cgroup watch adds and deletes them).
    pub(crate) fn add_cgroup_set(&mut self, set: &CgroupSetDef, id: u32) {
        let inner = nft::NfTablesMessage::NewSet(nft::SetMessage {
            attributes: vec![
                nft::SetAttribute::Table(self.table.clone()),
                nft::SetAttribute::Name(set.name().to_string()),
                nft::SetAttribute::Flags(nft::SetFlags::empty()),
                nft::SetAttribute::KeyType(CgroupSetDef::KEY_TYPE),
                nft::SetAttribute::KeyLen(CgroupSetDef::KEY_LEN),
                nft::SetAttribute::Id(id),
                nft::SetAttribute::Description(vec![nft::SetDescription::Size(CgroupSetDef::SIZE)]),
            ],
        });
        self.push(inner, NLM_F_CREATE | NLM_F_EXCL, Op::NewSet(set.name()));
    }

    pub(crate) fn add_chain(&mut self, chain: &Chain) {
        let inner = nft::NfTablesMessage::NewChain(nft::ChainMessage {
            attributes: vec![
                nft::ChainAttribute::Table(self.table.clone()),
                nft::ChainAttribute::Name(chain.name().to_string()),
                nft::ChainAttribute::Hook(vec![
                    nft::Hook::Number(nft::HookNumber::Inet(nft::InetHookNumber::from(
                        super::hook_number(chain.hook),
                    ))),
                    nft::Hook::Priority(chain.priority() as u32),
                ]),
                nft::ChainAttribute::Policy(chain.policy().code()),
                nft::ChainAttribute::Type(chain.kind.name().to_string()),
            ],
        });
        self.push(inner, NLM_F_CREATE | NLM_F_EXCL, Op::NewChain(chain.name()));
    }

    pub(crate) fn add_rule(&mut self, chain: &'static str, index: usize, exprs: &[Expr]) {
        let inner = nft::NfTablesMessage::NewRule(nft::RuleMessage {
            attributes: vec![
                nft::RuleAttribute::Table(self.table.clone()),
                nft::RuleAttribute::Chain(chain.to_string()),
                nft::RuleAttribute::Expressions(rule_expressions(exprs)),
            ],
        });
        self.push(
            inner,
            NLM_F_CREATE | NLM_F_APPEND,
            Op::NewRule { chain, index },
        );
    }

    /// Adds elements with their timeouts, [`MAX_ELEMS_PER_MESSAGE`] per message. Never
    /// `NLM_F_EXCL`.
    pub(crate) fn add_elements(&mut self, set: &'static str, elems: &[Elem<'_>]) {
        self.push_elements(set, elems, ElemChange::Add, |e| {
            vec![
                nft::SetElementAttribute::Key(nft::DataAttribute::Value(e.key.to_vec())),
                nft::SetElementAttribute::Timeout(e.timeout_ms),
            ]
        });
    }

    /// Adds elements without a timeout (cgroup ids), [`MAX_ELEMS_PER_MESSAGE`] per message.
    pub(crate) fn add_keys(&mut self, set: &'static str, keys: &[Vec<u8>]) {
        self.push_elements(set, keys, ElemChange::Add, |k| key_only(k));
    }

    /// Deletes elements by key.
    pub(crate) fn del_elements(&mut self, set: &'static str, keys: &[Vec<u8>]) {
        self.push_elements(set, keys, ElemChange::Delete, |k| key_only(k));
    }

    /// The one encoder of element messages: `items` in messages of at most
    /// [`MAX_ELEMS_PER_MESSAGE`] elements (one element list is a nested attribute with a 16-bit
    /// length), each element's attributes from `attributes`. Adds carry `NLM_F_CREATE` and
    /// never `NLM_F_EXCL` (re-adding an element must not abort the batch).
    fn push_elements<T>(
        &mut self,
        set: &'static str,
        items: &[T],
        change: ElemChange,
        attributes: impl Fn(&T) -> Vec<nft::SetElementAttribute>,
    ) {
        for chunk in items.chunks(MAX_ELEMS_PER_MESSAGE) {
            let list = chunk
                .iter()
                .map(|item| nft::ListAttribute::Element(attributes(item)))
                .collect();
            let message = nft::SetElementMessage {
                attributes: vec![
                    nft::SetElementList::Table(self.table.clone()),
                    nft::SetElementList::Set(set.to_string()),
                    nft::SetElementList::Elements(list),
                ],
            };
            let count = chunk.len();
            let (inner, flags, op) = match change {
                ElemChange::Add => (
                    nft::NfTablesMessage::NewSetElement(message),
                    NLM_F_CREATE,
                    Op::NewElems { set, count },
                ),
                ElemChange::Delete => (
                    nft::NfTablesMessage::DeleteSetElement(message),
                    0,
                    Op::DelElems { set, count },
                ),
            };
            self.push(inner, flags, op);
        }
    }

    /// Adds `table bridge <table>` with its one chain and rules (`firewall.bind`). The caller
    /// switches the batch to the bridge family first.
    pub(crate) fn add_bridge_layout(&mut self, layout: &crate::firewall::ruleset::BridgeLayout) {
        use crate::firewall::ruleset::{BIND_CHAIN, BIND_PRIORITY, ChainHook};
        self.add_table();
        self.add_bridge_chain(BIND_CHAIN, ChainHook::Prerouting, BIND_PRIORITY);
        for (i, rule) in layout.rules.iter().enumerate() {
            self.add_rule(BIND_CHAIN, i, &rule.exprs());
        }
    }

    /// Adds the whole layout: table, sets, chains, rules.
    pub(crate) fn add_layout(&mut self, layout: &Layout) {
        self.add_table();
        for (i, set) in layout.sets.iter().enumerate() {
            self.add_set(set, i as u32 + 1);
        }
        for (i, set) in layout.cgroup_sets.iter().enumerate() {
            self.add_cgroup_set(set, (layout.sets.len() + i) as u32 + 1);
        }
        for chain in &layout.chains {
            self.add_chain(chain);
        }
        for chain in &layout.chains {
            for (i, rule) in chain.rules.iter().enumerate() {
                self.add_rule(chain.name(), i, &rule.exprs());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_netfilter::nftables::NfTablesMessageType as Ty;

    use super::super::attrs::{be64_of, nla, nlas, replies};
    use super::super::dump::{NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_TIMEOUT};
    use super::super::nft_type;
    use super::*;

    const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;

    #[test]
    fn batch_layout_is_well_formed() {
        let mut b = Batch {
            buf: Vec::new(),
            table: "t".into(),
            first_seq: 1,
            next_seq: 2,
            ops: Vec::new(),
            family: TableFamily::Inet,
        };
        append(&mut b.buf, &control_message(ControlMessage::BatchBegin, 1));
        let keys = vec![vec![1u8, 2, 3, 4]; 2500];
        let elems: Vec<Elem<'_>> = keys
            .iter()
            .map(|k| Elem {
                key: k,
                timeout_ms: 1000,
            })
            .collect();
        b.add_elements("allow4", &elems);
        assert_eq!(b.len(), 3);
        let msgs: Vec<_> = replies(&b.buf).collect();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0].ty, NFNL_MSG_BATCH_BEGIN);
        for m in &msgs[1..] {
            assert_eq!(m.ty, nft_type(Ty::NewSetElement));
            assert_eq!(
                m.flags & NLM_F_EXCL,
                0,
                "element adds must never be exclusive"
            );
            assert_ne!(m.flags & NLM_F_ACK, 0);
            let list = nla(&m.payload[4..], NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
            let n = nlas(list).count();
            assert!(n == 1000 || n == 500);
            let first = nlas(list).next().unwrap().1;
            assert_eq!(
                nla(first, NFTA_SET_ELEM_TIMEOUT).and_then(be64_of),
                Some(1000)
            );
        }
    }
}
