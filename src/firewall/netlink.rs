//! The only file that talks netlink: the socket, batches, acknowledgements and dumps.
//!
//! Messages are built with `netlink-packet-netfilter`'s typed nf_tables messages; the
//! expressions it has no type for (`ct`, `fib`, `limit`, `log`) are encoded here as raw
//! attributes. Replies are parsed by a few lines of raw attribute walking, which does not depend
//! on the young crate's parsers.
//!
//! # Transactions
//!
//! Every change is one nfnetlink batch: `BATCH_BEGIN`, the messages, `BATCH_END`, in a single
//! `send`. The kernel processes the whole batch inside that `send` and commits it all or nothing;
//! each message carries `NLM_F_ACK`, so by the time `send` returns the socket holds one
//! acknowledgement (or error) per message. [`NfSocket::commit`] reads them all and succeeds only
//! if every message was acknowledged with 0: once it returns `Ok`, the elements are in the set.
//!
//! Traps avoided here:
//! * element adds never carry `NLM_F_EXCL`: re-adding an existing element would fail with
//!   `EEXIST` and abort the whole batch (kernel 6.18 overwrites the timeout instead);
//! * one element list is a nested attribute with a 16-bit length: at most
//!   [`MAX_ELEMS_PER_MESSAGE`] elements per message;
//! * the batch must fit in one `send`: the send buffer is raised with `SO_SNDBUFFORCE`;
//! * `NETLINK_CAP_ACK` keeps error replies from echoing whole element lists back, and
//!   `NETLINK_EXT_ACK` adds the kernel's own explanation to errors;
//! * a netlink socket belongs to the network namespace of the thread that opened it.

use std::fmt;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::nftables as nft;
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, sockopt};
use nix::sys::time::TimeVal;

use super::ruleset::{CHAIN_POLICY, CHAIN_PRIORITY, Chain, Expr, Layout, MetaKey, SetDef};

/// Elements per `NEWSETELEM` message (the element list's length field is 16 bits; the largest
/// element, an IPv6 pair with its timeout, takes 56 bytes).
pub(crate) const MAX_ELEMS_PER_MESSAGE: usize = 1000;
/// Requested socket buffers. `SO_SNDBUFFORCE` ignores `wmem_max` (needs CAP_NET_ADMIN, which
/// nf_tables needs anyway).
const SOCKET_BUFFER: usize = 8 << 20;
/// Receive buffer for one datagram (dumps come in skbs of at most a few pages).
const RECV_BUFFER: usize = 256 << 10;
/// How long to wait for a reply that the kernel should already have queued.
const RECV_TIMEOUT_SECS: i64 = 5;
/// Dumps interrupted by a concurrent ruleset change are retried this often.
const DUMP_ATTEMPTS: usize = 5;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | 0x4000);

// nf_tables message types (low byte; the high byte is the subsystem).
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_NEWRULE: u8 = 6;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_NEWSETELEM: u8 = 12;

// Attributes of the expressions the crate has no type for (include/uapi/linux/netfilter/nf_tables.h).
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_OIF: u32 = 1;
const NFTA_FIB_F_SADDR: u32 = 1 << 0;
const NFTA_FIB_F_IIF: u32 = 1 << 3;
const NFTA_FIB_F_PRESENT: u32 = 1 << 5;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
const NFTA_LIMIT_FLAGS: u16 = 5;
const NFT_LIMIT_PKTS: u32 = 0;
const NFTA_LOG_PREFIX: u16 = 2;

// Attributes read back from dumps.
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_HOOK_DEV: u16 = 3;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;

/// What a message of a batch does, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Batch,
    NewTable,
    DelTable,
    NewSet(&'static str),
    NewChain(&'static str),
    NewRule { chain: &'static str, index: usize },
    NewElems { set: &'static str, count: usize },
    DelElems { set: &'static str, count: usize },
    Dump(&'static str),
    Socket(&'static str),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Batch => write!(f, "committing the batch"),
            Op::NewTable => write!(f, "creating the table"),
            Op::DelTable => write!(f, "deleting the table"),
            Op::NewSet(s) => write!(f, "creating set {s}"),
            Op::NewChain(c) => write!(f, "creating chain {c}"),
            Op::NewRule { chain, index } => write!(f, "adding rule {} of chain {chain}", index + 1),
            Op::NewElems { set, count } => write!(f, "adding {count} element(s) to set {set}"),
            Op::DelElems { set, count } => {
                write!(f, "deleting {count} element(s) from set {set}")
            }
            Op::Dump(what) => write!(f, "listing {what}"),
            Op::Socket(what) => write!(f, "{what}"),
        }
    }
}

/// A netlink failure.
#[derive(Debug)]
pub(crate) enum NlError {
    /// The socket itself failed.
    Io { op: Op, errno: Errno },
    /// The kernel refused a message.
    Kernel {
        op: Op,
        errno: Errno,
        /// The kernel's extended acknowledgement message, if any.
        detail: Option<String>,
    },
    /// Missing or malformed replies.
    Protocol(String),
}

impl NlError {
    pub(crate) fn errno(&self) -> Option<Errno> {
        match self {
            NlError::Io { errno, .. } | NlError::Kernel { errno, .. } => Some(*errno),
            NlError::Protocol(_) => None,
        }
    }

    pub(crate) fn op(&self) -> Option<&Op> {
        match self {
            NlError::Io { op, .. } | NlError::Kernel { op, .. } => Some(op),
            NlError::Protocol(_) => None,
        }
    }

    /// Whether the kernel refused the content (as opposed to the socket or protocol failing).
    pub(crate) fn is_kernel(&self) -> bool {
        matches!(self, NlError::Kernel { .. })
    }

    pub(crate) fn is_permission(&self) -> bool {
        matches!(self.errno(), Some(Errno::EPERM | Errno::EACCES))
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NlError::Io { op, errno } => write!(f, "{op}: {} ({errno:?})", errno.desc()),
            NlError::Kernel { op, errno, detail } => {
                write!(f, "{op}: {} ({errno:?})", errno.desc())?;
                if let Some(d) = detail {
                    write!(f, ": {d}")?;
                }
                Ok(())
            }
            NlError::Protocol(m) => write!(f, "{m}"),
        }
    }
}

fn io_err(op: Op, e: Errno) -> NlError {
    NlError::Io { op, errno: e }
}

/// One element to add: key bytes and timeout in milliseconds (never 0).
pub(crate) struct Elem<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) timeout_ms: u64,
}

/// An nf_tables batch under construction.
pub(crate) struct Batch {
    buf: Vec<u8>,
    table: String,
    first_seq: u32,
    next_seq: u32,
    ops: Vec<(u32, Op)>,
}

fn nft_message(
    inner: nft::NfTablesMessage,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let msg = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        inner,
    );
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    m
}

fn control_message(inner: ControlMessage, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let msg = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        inner,
    );
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    m.finalize();
    m
}

fn append(buf: &mut Vec<u8>, m: &NetlinkMessage<NetfilterMessage>) {
    let start = buf.len();
    buf.resize(start + m.buffer_len(), 0);
    if let Some(dst) = buf.get_mut(start..) {
        m.serialize(dst);
    }
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
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
        Expr::Log { prefix } => {
            let mut p = prefix.as_bytes().to_vec();
            p.push(0);
            raw("log", vec![DefaultNla::new(NFTA_LOG_PREFIX, p)])
        }
        Expr::Verdict(v) => nft::Expressions::Immediate(vec![
            nft::Immediate::DestinationRegister(nft::Register::Verdict),
            nft::Immediate::Data(nft::DataAttribute::Verdict(vec![
                nft::VerdictAttribute::Code(nft::Verdict::Other(v.code())),
            ])),
        ]),
    };
    nft::ListAttribute::from(ex)
}

fn rule_expressions(exprs: &[Expr]) -> Vec<nft::ListAttribute<nft::ExpressionAttribute>> {
    exprs.iter().map(expression).collect()
}

impl Batch {
    fn push(&mut self, inner: nft::NfTablesMessage, flags: u16, op: Op) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        append(
            &mut self.buf,
            &nft_message(inner, NLM_F_REQUEST | NLM_F_ACK | flags, seq),
        );
        self.ops.push((seq, op));
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

    pub(crate) fn add_chain(&mut self, chain: &Chain) {
        let inner = nft::NfTablesMessage::NewChain(nft::ChainMessage {
            attributes: vec![
                nft::ChainAttribute::Table(self.table.clone()),
                nft::ChainAttribute::Name(chain.name().to_string()),
                nft::ChainAttribute::Hook(vec![
                    nft::Hook::Number(nft::HookNumber::Inet(nft::InetHookNumber::from(
                        chain.hook.number(),
                    ))),
                    nft::Hook::Priority(CHAIN_PRIORITY as u32),
                ]),
                nft::ChainAttribute::Policy(CHAIN_POLICY.code()),
                nft::ChainAttribute::Type("filter".to_string()),
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
        for chunk in elems.chunks(MAX_ELEMS_PER_MESSAGE) {
            let list = chunk
                .iter()
                .map(|e| {
                    nft::ListAttribute::Element(vec![
                        nft::SetElementAttribute::Key(nft::DataAttribute::Value(e.key.to_vec())),
                        nft::SetElementAttribute::Timeout(e.timeout_ms),
                    ])
                })
                .collect();
            let inner = nft::NfTablesMessage::NewSetElement(nft::SetElementMessage {
                attributes: vec![
                    nft::SetElementList::Table(self.table.clone()),
                    nft::SetElementList::Set(set.to_string()),
                    nft::SetElementList::Elements(list),
                ],
            });
            self.push(
                inner,
                NLM_F_CREATE,
                Op::NewElems {
                    set,
                    count: chunk.len(),
                },
            );
        }
    }

    /// Deletes elements by key.
    pub(crate) fn del_elements(&mut self, set: &'static str, keys: &[Vec<u8>]) {
        for chunk in keys.chunks(MAX_ELEMS_PER_MESSAGE) {
            let list = chunk
                .iter()
                .map(|k| {
                    nft::ListAttribute::Element(vec![nft::SetElementAttribute::Key(
                        nft::DataAttribute::Value(k.clone()),
                    )])
                })
                .collect();
            let inner = nft::NfTablesMessage::DeleteSetElement(nft::SetElementMessage {
                attributes: vec![
                    nft::SetElementList::Table(self.table.clone()),
                    nft::SetElementList::Set(set.to_string()),
                    nft::SetElementList::Elements(list),
                ],
            });
            self.push(
                inner,
                0,
                Op::DelElems {
                    set,
                    count: chunk.len(),
                },
            );
        }
    }

    /// Adds the whole layout: table, sets, chains, rules.
    pub(crate) fn add_layout(&mut self, layout: &Layout) {
        self.add_table();
        for (i, set) in layout.sets.iter().enumerate() {
            self.add_set(set, i as u32 + 1);
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

/// One netlink message of a reply.
struct Reply<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn be64_of(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(b.get(..end).unwrap_or_default()).into_owned()
}

/// Iterates over the netlink messages of one datagram.
fn replies(mut buf: &[u8]) -> impl Iterator<Item = Reply<'_>> {
    std::iter::from_fn(move || {
        let len = u32_at(buf, 0)? as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let r = Reply {
            ty: u16_at(buf, 4)?,
            flags: u16_at(buf, 6)?,
            seq: u32_at(buf, 8)?,
            payload: buf.get(16..len)?,
        };
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
        Some(r)
    })
}

/// Iterates over the attributes in `buf` as (type without flags, value).
pub(crate) fn nlas(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(buf, 0)? as usize;
        let kind = u16_at(buf, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = buf.get(4..len)?;
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
        Some((kind, value))
    })
}

fn nla(buf: &[u8], kind: u16) -> Option<&[u8]> {
    nlas(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// The error code and extended-ack message of an `NLMSG_ERROR` reply.
fn parse_error(r: &Reply<'_>) -> Option<(i32, Option<String>)> {
    let code = i32::from_ne_bytes(r.payload.get(..4)?.try_into().ok()?);
    let mut detail = None;
    if r.flags & NLM_F_ACK_TLVS != 0 {
        // The original header follows the code; its payload too unless capped.
        let orig_len = if r.flags & NLM_F_CAPPED != 0 {
            16
        } else {
            u32_at(r.payload, 4).map_or(16, |l| l as usize)
        };
        let tlvs = r
            .payload
            .get(4 + ((orig_len + 3) & !3)..)
            .unwrap_or_default();
        detail = nla(tlvs, NLMSGERR_ATTR_MSG)
            .map(cstr)
            .filter(|s| !s.is_empty());
    }
    Some((code, detail))
}

/// The netlink socket to nf_tables, in the network namespace of the thread that opened it.
pub(crate) struct NfSocket {
    sock: Socket,
    seq: u32,
    rbuf: Vec<u8>,
    /// The effective send buffer: a batch must fit in it.
    sndbuf: usize,
}

impl NfSocket {
    /// Opens and configures the socket. Needs no privilege; changes to nf_tables need
    /// CAP_NET_ADMIN (in the namespace's user namespace).
    pub(crate) fn open() -> Result<NfSocket, NlError> {
        let op = || Op::Socket("opening the netlink socket");
        let mut sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| io_err(op(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        sock.bind_auto()
            .map_err(|e| io_err(op(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        // Best effort: both only make errors smaller or clearer.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        if nix::sys::socket::setsockopt(&sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = nix::sys::socket::setsockopt(&sock, sockopt::SndBuf, &SOCKET_BUFFER);
        }
        if nix::sys::socket::setsockopt(&sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = nix::sys::socket::setsockopt(&sock, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        nix::sys::socket::setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|e| io_err(Op::Socket("setting the receive timeout"), e))?;
        // The kernel doubles the value it stores and keeps half for bookkeeping.
        let sndbuf = nix::sys::socket::getsockopt(&sock, sockopt::SndBuf)
            .map(|b| b / 2)
            .unwrap_or(100_000);
        // Start sequence numbers from something unlikely to collide with stale replies.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(NfSocket {
            sock,
            seq,
            rbuf: vec![0; RECV_BUFFER],
            sndbuf,
        })
    }

    /// The largest batch, in bytes, that one `send` carries.
    pub(crate) fn max_batch_bytes(&self) -> usize {
        self.sndbuf.saturating_sub(4096).max(16 << 10)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Starts a batch on `table`.
    pub(crate) fn begin(&mut self, table: &str) -> Batch {
        let seq = self.next_seq();
        let mut buf = Vec::with_capacity(4096);
        append(&mut buf, &control_message(ControlMessage::BatchBegin, seq));
        Batch {
            buf,
            table: table.to_string(),
            first_seq: seq,
            next_seq: seq.wrapping_add(1),
            ops: Vec::new(),
        }
    }

    fn send(&self, buf: &[u8], op: Op) -> Result<(), NlError> {
        let sent = nix::sys::socket::send(self.sock.as_raw_fd(), buf, MsgFlags::empty())
            .map_err(|e| io_err(op, e))?;
        if sent != buf.len() {
            return Err(NlError::Protocol(format!(
                "netlink: sent {sent} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Receives one datagram into the buffer; returns its length.
    fn recv(&mut self, dontwait: bool) -> Result<Option<usize>, NlError> {
        let mut flags = MsgFlags::MSG_TRUNC;
        if dontwait {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut self.rbuf, flags) {
                Ok(n) if n > self.rbuf.len() => {
                    return Err(NlError::Protocol(format!(
                        "netlink: a reply of {n} bytes was truncated"
                    )));
                }
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(io_err(Op::Socket("reading netlink replies"), e)),
            }
        }
    }

    /// Sends the batch as one transaction and waits for every acknowledgement.
    pub(crate) fn commit(&mut self, batch: Batch) -> Result<(), NlError> {
        let Batch {
            mut buf,
            first_seq,
            next_seq,
            ops,
            ..
        } = batch;
        if ops.is_empty() {
            return Ok(());
        }
        let end_seq = next_seq;
        append(
            &mut buf,
            &control_message(ControlMessage::BatchEnd, end_seq),
        );
        self.seq = end_seq;
        self.send(&buf, Op::Batch)?;

        let in_batch = |seq: u32| seq.wrapping_sub(first_seq) <= end_seq.wrapping_sub(first_seq);
        let mut acked = vec![false; ops.len()];
        let mut remaining = ops.len();
        let mut first_error: Option<NlError> = None;
        while remaining > 0 {
            // Every reply is queued before send() returns; blocking only guards against a
            // kernel that does not answer, and stops once an error arrived.
            let Some(n) = self.recv(first_error.is_some())? else {
                if first_error.is_some() {
                    break;
                }
                return Err(NlError::Protocol(format!(
                    "netlink: no acknowledgement within {RECV_TIMEOUT_SECS} s for {remaining} of {} \
                     message(s); the transaction's outcome is unknown",
                    ops.len()
                )));
            };
            let datagram = self.rbuf.get(..n).unwrap_or_default();
            for r in replies(datagram) {
                if r.ty != NLMSG_ERROR || !in_batch(r.seq) {
                    continue;
                }
                let Some((code, detail)) = parse_error(&r) else {
                    continue;
                };
                // Message i of the batch has sequence number first_seq + 1 + i.
                let idx = usize::try_from(r.seq.wrapping_sub(first_seq).wrapping_sub(1))
                    .ok()
                    .filter(|i| ops.get(*i).is_some_and(|(s, _)| *s == r.seq));
                if let Some(i) = idx
                    && let Some(a) = acked.get_mut(i)
                    && !*a
                {
                    *a = true;
                    remaining -= 1;
                }
                if code != 0 && first_error.is_none() {
                    let op = idx
                        .and_then(|i| ops.get(i))
                        .map_or(Op::Batch, |(_, op)| op.clone());
                    first_error = Some(NlError::Kernel {
                        op,
                        errno: Errno::from_raw(-code),
                        detail,
                    });
                }
            }
        }
        // Drain anything left so that the next transaction starts clean.
        if first_error.is_some() {
            while self.recv(true)?.is_some() {}
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends one request and collects the payloads (after the nfgenmsg header) of the
    /// messages answering it, until the dump ends or the request is acknowledged.
    fn request(
        &mut self,
        ty: u8,
        attrs: Vec<DefaultNla>,
        dump: bool,
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, NlError> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.next_seq();
            let inner = nft::NfTablesMessage::Other {
                message_type: ty + 1, // the GET variant follows each NEW
                attributes: attrs.clone(),
            };
            let flags = if dump {
                NLM_F_REQUEST | NLM_F_DUMP
            } else {
                NLM_F_REQUEST | NLM_F_ACK
            };
            let mut buf = Vec::new();
            append(&mut buf, &nft_message(inner, flags, seq));
            self.send(&buf, Op::Dump(what))?;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let Some(n) = self.recv(false)? else {
                    return Err(NlError::Protocol(format!(
                        "netlink: no reply within {RECV_TIMEOUT_SECS} s while listing {what}"
                    )));
                };
                let datagram = self.rbuf.get(..n).unwrap_or_default();
                for r in replies(datagram) {
                    if r.seq != seq {
                        continue;
                    }
                    if r.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match r.ty {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            let (code, detail) = parse_error(&r).unwrap_or((0, None));
                            if code != 0 {
                                return Err(NlError::Kernel {
                                    op: Op::Dump(what),
                                    errno: Errno::from_raw(-code),
                                    detail,
                                });
                            }
                            break 'recv;
                        }
                        t if t == (NFNL_SUBSYS_NFTABLES << 8) | u16::from(ty) => {
                            out.push(r.payload.get(4..).unwrap_or_default().to_vec());
                        }
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NlError::Protocol(format!(
            "netlink: listing {what} was interrupted {DUMP_ATTEMPTS} times by ruleset changes"
        )))
    }

    /// Reads the table's layout, or `None` when there is no such table.
    pub(crate) fn read_table(&mut self, table: &str) -> Result<Option<KernelTable>, NlError> {
        let name = |kind: u16| {
            let mut v = table.as_bytes().to_vec();
            v.push(0);
            DefaultNla::new(kind, v)
        };
        let tables = match self.request(NFT_MSG_NEWTABLE, vec![name(1)], false, "the table") {
            Ok(t) => t,
            Err(NlError::Kernel {
                errno: Errno::ENOENT,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(t) = tables.first() else {
            return Ok(None);
        };
        let flags = nla(t, NFTA_TABLE_FLAGS).and_then(be32_of).unwrap_or(0);

        let mut chains = Vec::new();
        for c in self.request(NFT_MSG_NEWCHAIN, vec![name(1)], true, "chains")? {
            let hook = nla(&c, NFTA_CHAIN_HOOK);
            chains.push(KernelChain {
                name: nla(&c, NFTA_CHAIN_NAME).map(cstr).unwrap_or_default(),
                hook: hook
                    .and_then(|h| nla(h, NFTA_HOOK_HOOKNUM))
                    .and_then(be32_of),
                priority: hook
                    .and_then(|h| nla(h, NFTA_HOOK_PRIORITY))
                    .and_then(be32_of)
                    .map(|p| p as i32),
                has_device: hook.is_some_and(|h| nla(h, NFTA_HOOK_DEV).is_some()),
                policy: nla(&c, NFTA_CHAIN_POLICY).and_then(be32_of),
                kind: nla(&c, NFTA_CHAIN_TYPE).map(cstr),
            });
        }
        let mut sets = Vec::new();
        for s in self.request(NFT_MSG_NEWSET, vec![name(1)], true, "sets")? {
            sets.push(KernelSet {
                name: nla(&s, NFTA_SET_NAME).map(cstr).unwrap_or_default(),
                flags: nla(&s, NFTA_SET_FLAGS).and_then(be32_of).unwrap_or(0),
                key_type: nla(&s, NFTA_SET_KEY_TYPE).and_then(be32_of),
                key_len: nla(&s, NFTA_SET_KEY_LEN).and_then(be32_of),
                is_map: nla(&s, NFTA_SET_DATA_TYPE).is_some(),
                default_timeout: nla(&s, NFTA_SET_TIMEOUT).is_some(),
                size: nla(&s, NFTA_SET_DESC)
                    .and_then(|d| nla(d, NFTA_SET_DESC_SIZE))
                    .and_then(be32_of),
            });
        }
        let mut rules = Vec::new();
        for r in self.request(NFT_MSG_NEWRULE, vec![name(1)], true, "rules")? {
            rules.push(KernelRule {
                chain: nla(&r, NFTA_RULE_CHAIN).map(cstr).unwrap_or_default(),
                exprs: nla(&r, NFTA_RULE_EXPRESSIONS)
                    .map(parse_expressions)
                    .unwrap_or_default(),
            });
        }
        Ok(Some(KernelTable {
            flags,
            chains,
            sets,
            rules,
        }))
    }

    /// Lists the elements of `set`.
    pub(crate) fn read_elements(
        &mut self,
        table: &str,
        set: &str,
    ) -> Result<Vec<KernelElem>, NlError> {
        let s = |kind: u16, v: &str| {
            let mut b = v.as_bytes().to_vec();
            b.push(0);
            DefaultNla::new(kind, b)
        };
        let mut out = Vec::new();
        for m in self.request(
            NFT_MSG_NEWSETELEM,
            vec![s(1, table), s(2, set)],
            true,
            "set elements",
        )? {
            let Some(list) = nla(&m, NFTA_SET_ELEM_LIST_ELEMENTS) else {
                continue;
            };
            for (kind, e) in nlas(list) {
                if kind != NFTA_LIST_ELEM {
                    continue;
                }
                let Some(key) = nla(e, NFTA_SET_ELEM_KEY).and_then(|k| nla(k, NFTA_DATA_VALUE))
                else {
                    continue;
                };
                out.push(KernelElem {
                    key: key.to_vec(),
                    timeout_ms: nla(e, NFTA_SET_ELEM_TIMEOUT).and_then(be64_of),
                    expiration_ms: nla(e, NFTA_SET_ELEM_EXPIRATION).and_then(be64_of),
                });
            }
        }
        Ok(out)
    }
}

/// One expression as the kernel reports it: name, and its attributes as (type, raw value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawExpr {
    pub(crate) name: String,
    pub(crate) attrs: Vec<(u16, Vec<u8>)>,
}

fn parse_expressions(list: &[u8]) -> Vec<RawExpr> {
    nlas(list)
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .map(|(_, e)| RawExpr {
            name: nla(e, NFTA_EXPR_NAME).map(cstr).unwrap_or_default(),
            attrs: nla(e, NFTA_EXPR_DATA)
                .map(|d| nlas(d).map(|(k, v)| (k, v.to_vec())).collect())
                .unwrap_or_default(),
        })
        .collect()
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

#[derive(Debug)]
pub(crate) struct KernelChain {
    pub(crate) name: String,
    pub(crate) hook: Option<u32>,
    pub(crate) priority: Option<i32>,
    pub(crate) has_device: bool,
    pub(crate) policy: Option<u32>,
    pub(crate) kind: Option<String>,
}

#[derive(Debug)]
pub(crate) struct KernelSet {
    pub(crate) name: String,
    pub(crate) flags: u32,
    pub(crate) key_type: Option<u32>,
    pub(crate) key_len: Option<u32>,
    pub(crate) is_map: bool,
    pub(crate) default_timeout: bool,
    pub(crate) size: Option<u32>,
}

#[derive(Debug)]
pub(crate) struct KernelRule {
    pub(crate) chain: String,
    pub(crate) exprs: Vec<RawExpr>,
}

/// A table as read from the kernel.
#[derive(Debug)]
pub(crate) struct KernelTable {
    pub(crate) flags: u32,
    pub(crate) chains: Vec<KernelChain>,
    pub(crate) sets: Vec<KernelSet>,
    pub(crate) rules: Vec<KernelRule>,
}

/// One element as read from the kernel.
#[derive(Debug)]
pub(crate) struct KernelElem {
    pub(crate) key: Vec<u8>,
    /// The timeout it was added with; `None` (or 0) is a permanent element.
    pub(crate) timeout_ms: Option<u64>,
    /// Milliseconds left.
    pub(crate) expiration_ms: Option<u64>,
}

/// Attributes the kernel reports with their default value although nft does not send them.
fn is_kernel_default(name: &str, kind: u16, value: &[u8]) -> bool {
    const NFTA_LOOKUP_FLAGS: u16 = 5;
    const NFTA_BITWISE_OP: u16 = 6;
    const NFTA_LOG_LEVEL: u16 = 5;
    const NFT_LOGLEVEL_WARNING: u32 = 4;
    match (name, kind) {
        ("lookup", NFTA_LOOKUP_FLAGS) | ("bitwise", NFTA_BITWISE_OP) => be32_of(value) == Some(0),
        ("log", NFTA_LOG_LEVEL) => be32_of(value) == Some(NFT_LOGLEVEL_WARNING),
        _ => false,
    }
}

/// Attributes whose value is itself a list of attributes (`nft_data`): the kernel does not set
/// `NLA_F_NESTED` on the inner headers when it dumps them, the crate does when it sends them.
fn holds_nested_data(name: &str, kind: u16) -> bool {
    matches!(
        (name, kind),
        ("cmp", 3) | ("bitwise", 4 | 5 | 7) | ("immediate", 2)
    )
}

/// The value with the flag bits of its inner attribute headers cleared (one level only: the
/// bytes below are data, which must compare exactly).
fn without_inner_flags(value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    let mut at = 0;
    while let Some(len) = u16_at(&v, at) {
        let len = len as usize;
        if len < 4 || at + len > v.len() {
            break;
        }
        if let Some(b) = v.get_mut(at + 3) {
            *b &= 0x3f;
        }
        at += (len + 3) & !3;
    }
    v
}

fn canonical(e: &RawExpr) -> Vec<(u16, Vec<u8>)> {
    let mut attrs: Vec<(u16, Vec<u8>)> = e
        .attrs
        .iter()
        .filter(|(k, v)| !is_kernel_default(&e.name, *k, v))
        .map(|(k, v)| {
            if holds_nested_data(&e.name, *k) {
                (*k, without_inner_flags(v))
            } else {
                (*k, v.clone())
            }
        })
        .collect();
    attrs.sort();
    attrs
}

fn same_expr(ours: &RawExpr, theirs: &RawExpr) -> bool {
    ours.name == theirs.name && canonical(ours) == canonical(theirs)
}

/// Compares a table read from the kernel with the layout; `Err` says the first difference.
pub(crate) fn compare(layout: &Layout, k: &KernelTable) -> Result<(), String> {
    if k.flags != 0 {
        return Err(format!("table flags are {:#x} (dormant?)", k.flags));
    }
    if k.sets.len() != layout.sets.len() {
        return Err(format!(
            "{} set(s) instead of {}",
            k.sets.len(),
            layout.sets.len()
        ));
    }
    for want in &layout.sets {
        let Some(got) = k.sets.iter().find(|s| s.name == want.name()) else {
            return Err(format!("set {} is missing", want.name()));
        };
        if got.flags != NFT_SET_TIMEOUT
            || got.key_type != Some(want.key_type())
            || got.key_len != Some(want.key_len())
            || got.is_map
            || got.default_timeout
            || got.size != Some(want.size)
        {
            return Err(format!(
                "set {} has another type, size or flags",
                want.name()
            ));
        }
    }
    if k.chains.len() != layout.chains.len() {
        return Err(format!(
            "{} chain(s) instead of {}",
            k.chains.len(),
            layout.chains.len()
        ));
    }
    for want in &layout.chains {
        let Some(got) = k.chains.iter().find(|c| c.name == want.name()) else {
            return Err(format!("chain {} is missing", want.name()));
        };
        if got.hook != Some(want.hook.number())
            || got.priority != Some(CHAIN_PRIORITY)
            || got.has_device
            || got.policy != Some(CHAIN_POLICY.code())
            || got.kind.as_deref() != Some("filter")
        {
            return Err(format!(
                "chain {} has another hook, priority, type or policy",
                want.name()
            ));
        }
        let got_rules: Vec<&KernelRule> =
            k.rules.iter().filter(|r| r.chain == want.name()).collect();
        if got_rules.len() != want.rules.len() {
            return Err(format!(
                "chain {} has {} rule(s) instead of {}",
                want.name(),
                got_rules.len(),
                want.rules.len()
            ));
        }
        for (i, (w, g)) in want.rules.iter().zip(got_rules).enumerate() {
            let ours = raw_expressions(&w.exprs());
            let same = ours.len() == g.exprs.len()
                && ours.iter().zip(&g.exprs).all(|(a, b)| same_expr(a, b));
            if !same {
                return Err(format!(
                    "rule {} of chain {} differs (want: {})",
                    i + 1,
                    want.name(),
                    w.text()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
            assert_eq!(
                m.ty,
                (NFNL_SUBSYS_NFTABLES << 8) | u16::from(NFT_MSG_NEWSETELEM)
            );
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

    #[test]
    fn raw_expressions_round_trip() {
        let exprs = vec![
            Expr::CtState,
            Expr::Cmp {
                neq: true,
                data: vec![0; 4],
            },
            Expr::Verdict(super::super::ruleset::Verdict::Accept),
        ];
        let raw = raw_expressions(&exprs);
        assert_eq!(raw.len(), 3);
        assert_eq!(raw[0].name, "ct");
        assert_eq!(raw[2].name, "immediate");
    }
}
