//! Reading back what the kernel holds: a table with its chains, sets and rules, and the
//! elements of a set (with their timeouts and time left).

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
};
use netlink_packet_netfilter::nftables::{self as nft, NfTablesMessageType as Ty};
use nix::errno::Errno;

use super::attrs::{be32_of, be64_of, cstr, nla, nlas, parse_error, replies};
use super::batch::{TableFamily, append, nft_message};
use super::error::{NlError, Op};
use super::nft_type;
use super::socket::{NfSocket, RECV_TIMEOUT_SECS};

/// Dumps interrupted by a concurrent ruleset change are retried this often.
const DUMP_ATTEMPTS: usize = 5;

const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_HANDLE: u16 = 4;
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
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;

impl NfSocket {
    /// Sends one request and collects the payloads (after the nfgenmsg header) of the
    /// messages answering it, until the dump ends or the request is acknowledged.
    fn request(
        &mut self,
        get: Ty,
        attrs: Vec<DefaultNla>,
        dump: bool,
        what: &'static str,
        family: TableFamily,
    ) -> Result<Vec<Vec<u8>>, NlError> {
        // The kernel answers a GET with the objects as NEW messages.
        let answer = match get {
            Ty::GetTable => Ty::NewTable,
            Ty::GetChain => Ty::NewChain,
            Ty::GetSet => Ty::NewSet,
            Ty::GetRule => Ty::NewRule,
            Ty::GetSetElement => Ty::NewSetElement,
            other => other,
        };
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.next_seq();
            let inner = nft::NfTablesMessage::Other {
                message_type: u8::from(get),
                attributes: attrs.clone(),
            };
            let flags = if dump {
                NLM_F_REQUEST | NLM_F_DUMP
            } else {
                NLM_F_REQUEST | NLM_F_ACK
            };
            let mut buf = Vec::new();
            append(&mut buf, &nft_message(inner, flags, seq, family));
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
                        t if t == nft_type(answer) => {
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

    /// The table's handle (a table deleted and created again gets a new one), or `None` when
    /// there is no such table. One small request: cheap enough to ask every poll.
    pub(crate) fn table_handle(&mut self, table: &str) -> Result<Option<u64>, NlError> {
        let mut v = table.as_bytes().to_vec();
        v.push(0);
        match self.request(
            Ty::GetTable,
            vec![DefaultNla::new(1, v)],
            false,
            "the table",
            TableFamily::Inet,
        ) {
            Ok(t) => Ok(t
                .first()
                .and_then(|t| nla(t, NFTA_TABLE_HANDLE))
                .and_then(be64_of)),
            Err(NlError::Kernel {
                errno: Errno::ENOENT,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the `inet` table's layout, or `None` when there is no such table.
    pub(crate) fn read_table(&mut self, table: &str) -> Result<Option<KernelTable>, NlError> {
        self.read_table_in(TableFamily::Inet, table)
    }

    /// Reads the layout of `table <family> <table>`, or `None` when there is no such table.
    pub(crate) fn read_table_in(
        &mut self,
        family: TableFamily,
        table: &str,
    ) -> Result<Option<KernelTable>, NlError> {
        let name = |kind: u16| {
            let mut v = table.as_bytes().to_vec();
            v.push(0);
            DefaultNla::new(kind, v)
        };
        let tables = match self.request(Ty::GetTable, vec![name(1)], false, "the table", family) {
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
        for c in self.request(Ty::GetChain, vec![name(1)], true, "chains", family)? {
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
        for s in self.request(Ty::GetSet, vec![name(1)], true, "sets", family)? {
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
        for r in self.request(Ty::GetRule, vec![name(1)], true, "rules", family)? {
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
            Ty::GetSetElement,
            vec![s(1, table), s(2, set)],
            true,
            "set elements",
            TableFamily::Inet,
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

pub(super) fn parse_expressions(list: &[u8]) -> Vec<RawExpr> {
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
