//! Whether the table the kernel holds is the one the policy asks for.
//!
//! At start-up an existing table with exactly our layout is kept (elements and all, so a restart
//! cuts no live allowance); anything else is replaced. This is semantics, not transport: the
//! kernel reports a few attributes nft never sends (with their default values), and does not set
//! `NLA_F_NESTED` on the inner headers of `nft_data` values, so both sides are brought to one
//! canonical form before they are compared.

use netlink_packet_netfilter::nftables::SetFlags;

use super::netlink::{
    KernelRule, KernelTable, RawExpr, be32_of, hook_number, raw_expressions, u16_at,
};
use super::ruleset::{BIND_CHAIN, BIND_PRIORITY, BridgeLayout, CgroupSetDef, ChainHook, Layout};

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
        ("cmp", 3) | ("bitwise", 4 | 5 | 7) | ("immediate", 2) | ("range", 3 | 4)
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
    let want_sets = layout.sets.len() + layout.cgroup_sets.len();
    if k.sets.len() != want_sets {
        return Err(format!("{} set(s) instead of {want_sets}", k.sets.len()));
    }
    for want in &layout.cgroup_sets {
        let Some(got) = k.sets.iter().find(|s| s.name == want.name()) else {
            return Err(format!("set {} is missing", want.name()));
        };
        if got.flags != 0
            || got.key_type != Some(CgroupSetDef::KEY_TYPE)
            || got.key_len != Some(CgroupSetDef::KEY_LEN)
            || got.is_map
            || got.default_timeout
            || got.size != Some(CgroupSetDef::SIZE)
        {
            return Err(format!(
                "set {} has another type, size or flags",
                want.name()
            ));
        }
    }
    for want in &layout.sets {
        let Some(got) = k.sets.iter().find(|s| s.name == want.name()) else {
            return Err(format!("set {} is missing", want.name()));
        };
        if got.flags != SetFlags::Timeout.bits()
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
        if got.hook != Some(hook_number(want.hook))
            || got.priority != Some(want.priority())
            || got.has_device
            || got.policy != Some(want.policy().code())
            || got.kind.as_deref() != Some(want.kind.name())
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

/// Compares the `bridge` table read from the kernel with the one `firewall.bind` asks for;
/// `Err` says the first difference.
pub(crate) fn compare_bridge(layout: &BridgeLayout, k: &KernelTable) -> Result<(), String> {
    if k.flags != 0 {
        return Err(format!("table flags are {:#x} (dormant?)", k.flags));
    }
    if !k.sets.is_empty() {
        return Err(format!("{} set(s) instead of none", k.sets.len()));
    }
    let [got] = k.chains.as_slice() else {
        return Err(format!("{} chain(s) instead of 1", k.chains.len()));
    };
    if got.name != BIND_CHAIN
        || got.hook != Some(hook_number(ChainHook::Prerouting))
        || got.priority != Some(BIND_PRIORITY)
        || got.has_device
        || got.policy != Some(1)
        || got.kind.as_deref() != Some("filter")
    {
        return Err(format!(
            "chain {} is not `{BIND_CHAIN}`, type filter hook prerouting priority filter, \
             policy accept",
            got.name
        ));
    }
    if k.rules.len() != layout.rules.len() {
        return Err(format!(
            "chain {BIND_CHAIN} has {} rule(s) instead of {}",
            k.rules.len(),
            layout.rules.len()
        ));
    }
    for (i, (w, g)) in layout.rules.iter().zip(&k.rules).enumerate() {
        let ours = raw_expressions(&w.exprs());
        let same = g.chain == BIND_CHAIN
            && ours.len() == g.exprs.len()
            && ours.iter().zip(&g.exprs).all(|(a, b)| same_expr(a, b));
        if !same {
            return Err(format!(
                "rule {} of chain {BIND_CHAIN} differs (want: {})",
                i + 1,
                w.text()
            ));
        }
    }
    Ok(())
}
