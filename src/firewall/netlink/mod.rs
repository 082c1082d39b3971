//! The only code that talks netlink: the socket, batches, acknowledgements and dumps.
//!
//! Messages are built with `netlink-packet-netfilter`'s typed nf_tables messages; the
//! expressions it has no type for (`ct`, `fib`, `limit`, `log`) are encoded as raw attributes.
//! Replies are parsed by a few lines of raw attribute walking, which does not depend on the
//! young crate's parsers.
//!
//! Parts, one concern each:
//! * `socket`: [`NfSocket`], sending a batch in one `send` and collecting its acknowledgements;
//! * `batch`: `Batch`, encoding tables, sets, chains, rules and elements into one transaction;
//! * `expr`: lowering the ruleset's [`Expr`](super::ruleset::Expr)s to netlink expressions;
//! * `attrs`: walking raw netlink messages and attributes (replies, dumps, errors);
//! * `dump`: reading a table, its chains, sets, rules and elements back from the kernel;
//! * `nflog`: reading the NFLOG group the drop rules log to ([`DropReader`]);
//! * `error`: what failed ([`Op`]) and how ([`NlError`]).
//!
//! Whether a table read back is the one we want is semantics, not transport: `super::compare`.
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
//!   `MAX_ELEMS_PER_MESSAGE` (1,000) elements per message;
//! * the batch must fit in one `send`: the send buffer is raised with `SO_SNDBUFFORCE`;
//! * `NETLINK_CAP_ACK` keeps error replies from echoing whole element lists back, and
//!   `NETLINK_EXT_ACK` adds the kernel's own explanation to errors;
//! * a netlink socket belongs to the network namespace of the thread that opened it.

mod attrs;
mod batch;
mod dump;
mod error;
mod expr;
mod nflog;
mod socket;

pub(crate) use attrs::{be32_of, u16_at};
pub(crate) use batch::{Batch, Elem, TableFamily};
pub(crate) use dump::{KernelRule, KernelTable, RawExpr};
pub(crate) use error::{NlError, Op};
pub(crate) use expr::raw_expressions;
pub use nflog::{DropReader, DroppedPacket};
pub(crate) use socket::NfSocket;

/// The nf_tables subsystem number in the high byte of a message type.
fn nftables_subsys() -> u16 {
    u16::from(u8::from(
        netlink_packet_netfilter::NetfilterSubsystem::NfTables,
    ))
}

/// The netlink message type of an nf_tables message.
fn nft_type(t: netlink_packet_netfilter::nftables::NfTablesMessageType) -> u16 {
    (nftables_subsys() << 8) | u16::from(u8::from(t))
}

/// The netfilter hook number of a base chain.
pub(crate) fn hook_number(hook: crate::firewall::ruleset::ChainHook) -> u32 {
    use crate::firewall::ruleset::ChainHook;
    use netlink_packet_netfilter::nftables::InetHookNumber;
    u32::from(match hook {
        ChainHook::Input => InetHookNumber::LocalIn,
        ChainHook::Forward => InetHookNumber::Forward,
        ChainHook::Output => InetHookNumber::LocalOut,
        ChainHook::Prerouting => InetHookNumber::PreRouting,
    })
}

/// The name nft gives a netfilter hook number of the inet family.
pub(crate) fn hook_name(number: u32) -> String {
    use netlink_packet_netfilter::nftables::InetHookNumber;
    match InetHookNumber::from(number) {
        InetHookNumber::PreRouting => "prerouting".to_string(),
        InetHookNumber::LocalIn => "input".to_string(),
        InetHookNumber::Forward => "forward".to_string(),
        InetHookNumber::LocalOut => "output".to_string(),
        InetHookNumber::PostRouting => "postrouting".to_string(),
        InetHookNumber::Ingress => "ingress".to_string(),
        _ => format!("hook {number}"),
    }
}
