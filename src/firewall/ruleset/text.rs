//! The layout as nft text, exactly as `nft list table` prints it.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::model::{CgroupSetDef, Family, LOG_PREFIX, LOG_RATE_PER_SECOND, Layout, Match, Rule};

impl Layout {
    /// The layout as nft text, formatted exactly like `nft list table inet <table>` prints it
    /// (when its sets are empty), after a comment header.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# nftables ruleset of dnsfence (what `dnsfence` installs at start-up).\n\
             # Compare with the live table: nft list table inet {t}\n\
             # Apply by hand (replaces the table, dropping its elements):\n\
             #   nft delete table inet {t}; nft -f <this file>",
            t = self.table
        );
        let _ = writeln!(s, "table inet {} {{", self.table);
        let mut first = true;
        for set in &self.sets {
            if !first {
                s.push('\n');
            }
            first = false;
            let _ = writeln!(s, "\tset {} {{", set.name());
            let _ = writeln!(s, "\t\ttype {}", set.type_text());
            let _ = writeln!(s, "\t\tsize {}", set.size);
            let _ = writeln!(s, "\t\tflags timeout");
            let _ = writeln!(s, "\t}}");
        }
        for set in &self.cgroup_sets {
            if !first {
                s.push('\n');
            }
            first = false;
            let _ = writeln!(s, "\tset {} {{", set.name());
            let _ = writeln!(s, "\t\ttype cgroupsv2");
            let _ = writeln!(s, "\t\tsize {}", CgroupSetDef::SIZE);
            let _ = writeln!(s, "\t}}");
        }
        for chain in &self.chains {
            if !first {
                s.push('\n');
            }
            first = false;
            let _ = writeln!(s, "\tchain {} {{", chain.name());
            let _ = writeln!(
                s,
                "\t\ttype {} hook {} priority {}; policy {};",
                chain.kind.name(),
                chain.hook.name(),
                chain.priority_name(),
                chain.policy().name()
            );
            for r in &chain.rules {
                let _ = writeln!(s, "\t\t{}", r.text());
            }
            let _ = writeln!(s, "\t}}");
        }
        s.push_str("}\n");
        s
    }
}

fn addr_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

impl Match {
    pub(super) fn text(&self) -> String {
        match self {
            Match::Mark(m) => format!("meta mark 0x{m:08x}"),
            Match::OifLo => "oif \"lo\"".to_string(),
            Match::IifLo => "iif \"lo\"".to_string(),
            Match::NfProto(f) => format!("meta nfproto {}", f.nft_name()),
            Match::Daddr(net) => {
                let f = Family::of(net.addr());
                format!("{} daddr {}", f.header(), addr_text(net))
            }
            Match::Dport(p, port) => format!("{} dport {port}", p.name()),
            Match::Sport(p, port) => format!("{} sport {port}", p.name()),
            Match::Saddr(ip) => format!("{} saddr {ip}", Family::of(*ip).header()),
            Match::CtEstablishedRelated => "ct state established,related".to_string(),
            Match::AllowSet { family, per_client } => {
                let h = family.header();
                if *per_client {
                    format!("{h} saddr . {h} daddr @{}", family.set_name())
                } else {
                    format!("{h} daddr @{}", family.set_name())
                }
            }
            Match::FibSaddrIifOifMissing => "fib saddr . iif oif missing".to_string(),
            Match::FibSaddrNotLocal => "fib saddr type != local".to_string(),
            Match::FibDaddrLocal => "fib daddr type local".to_string(),
            Match::Icmpv6(t) => format!("icmpv6 type {}", t.name()),
            Match::HopLimit255 => "ip6 hoplimit 255".to_string(),
            Match::CtDirectionReply => "ct direction reply".to_string(),
            Match::CtDirectionOriginal => "ct direction original".to_string(),
            Match::OpenedToPort(p, port) => format!(
                "ct direction original meta l4proto {} ct original proto-dst {port}",
                p.name()
            ),
            Match::SkUidNotRoot => "meta skuid != 0".to_string(),
            Match::SkUidNot(u) => format!("meta skuid != {u}"),
            Match::SkGidNot(g) => format!("meta skgid != {g}"),
            Match::SkUidNotIn(r) => format!("meta skuid != {}-{}", r.first, r.last),
            Match::SkGidNotIn(r) => format!("meta skgid != {}-{}", r.first, r.last),
            Match::CgroupOutside { level } => {
                format!(
                    "socket cgroupv2 level {level} @{}",
                    super::model::cgroup_set_name(*level)
                )
            }
            Match::IifNameNot(name) => format!("iifname != \"{name}\""),
            Match::OifNameNot(name) => format!("oifname != \"{name}\""),
            Match::SaddrNotIn(net) => {
                let f = Family::of(net.addr());
                format!("{} saddr != {}", f.header(), addr_text(net))
            }
            Match::DaddrNotIn(net) => {
                let f = Family::of(net.addr());
                format!("{} daddr != {}", f.header(), addr_text(net))
            }
            Match::CtStatusDnat => "ct status dnat".to_string(),
            Match::Limit => format!("limit rate {LOG_RATE_PER_SECOND}/second"),
            Match::Log(None) => format!("log prefix \"{LOG_PREFIX}\""),
            Match::Log(Some(group)) => format!("log prefix \"{LOG_PREFIX}\" group {group}"),
        }
    }
}

impl Rule {
    /// The rule as nft prints it.
    pub(crate) fn text(&self) -> String {
        let mut parts: Vec<String> = self.matches.iter().map(Match::text).collect();
        if let Some(v) = self.verdict {
            parts.push(v.name().to_string());
        }
        if let Some(to) = self.dnat {
            let family = Family::of(to.ip());
            parts.push(format!("dnat {} to {to}", family.header()));
        }
        parts.join(" ")
    }
}
