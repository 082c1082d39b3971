//! `firewall.contain`: the gate at the top of each chain that lets everything that is not an
//! agent's pass to the host's own firewall.
//!
//! A gate is one rule per chain (two on routed chains with `sources`, one per IP family):
//! "the packet matches none of the contained selectors: accept". An `accept` in dnsfence's
//! table ends only dnsfence's verdict; the packet goes on to every other table and hook, so
//! the host's own rules still decide about it. Written as a conjunction of negations (`meta
//! skuid != 1000 meta skgid != 100 … accept`) rather than a jump to a chain of positive
//! matches, so the chains stay base chains and a packet whose owner cannot be read (no
//! socket: a RST or ICMP error the kernel sends itself) fails the gate's first match and stays
//! under the default-drop rules: what cannot be told apart is contained (fail closed).
//!
//! Selectors by hook: processes on this host are named by the owner of their socket (`uids`,
//! `gids`, `cgroups`; the `output` chain), agents routed through this host by their interface
//! and addresses (`interfaces`, `sources`; `prerouting`, `input` and `forward`, where
//! `forward` also checks the output interface and the destination, so that traffic *to* an
//! agent is contained as well).
//!
//! A cgroup is matched by its id, which is the inode number of its directory in the cgroup2
//! file system, at the path's level (`socket cgroupv2 level 2` compares the socket's ancestor
//! two levels below the root; for a socket in a shallower cgroup the expression does not
//! match at all, so the gate tests every level of the path, one rule per combination: a
//! process in a sibling service at level 2 differs at level 2, one in `init.scope` at level 1;
//! only the root cgroup and the path's own ancestors stay contained). Measured here with
//! nested cgroups in a namespace: a process in a sibling cgroup got through (a RST from the
//! peer), one in the contained cgroup and one in its parent timed out. The id is looked up when the rule is built: a cgroup that does
//! not exist is an error, and a cgroup deleted and re-created later has a new id (restart
//! dnsfence after re-creating it).

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::build::normalize_net;
use super::model::{Family, Match, Rule, Verdict};
use crate::policy::Contain;

/// One cgroup to match, as the ids of its path's prefixes: `a`, `a/b`, `a/b/c` at levels 1,
/// 2, 3. A socket is outside `a/b/c` when its ancestor at *some* level differs from the
/// prefix there; testing only the last level would fail for a socket in a shallower cgroup
/// (`socket cgroupv2 level 3` does not match at all when the socket's cgroup is at level 2),
/// which would contain every process of a shallower service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cgroup {
    /// (level, path prefix, id), from level 1 down to the cgroup itself.
    prefixes: Vec<(u32, String, u64)>,
}

/// The most gate rules the cgroups may take (one per combination of levels).
const MAX_GATE_RULES: usize = 64;

/// `firewall.contain` with its cgroups resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Contained {
    uids: Vec<u32>,
    gids: Vec<u32>,
    cgroups: Vec<Cgroup>,
    interfaces: Vec<String>,
    sources: Vec<IpNet>,
}

/// How cgroup paths become ids: [`cgroup_id`] when installing, a placeholder when only
/// rendering text (which shows the path, not the id).
pub(crate) type CgroupResolver<'a> = &'a dyn Fn(&str) -> Result<u64, String>;

impl Contained {
    pub(super) fn of(c: &Contain, resolve: CgroupResolver<'_>) -> Result<Contained, String> {
        let mut cgroups = Vec::new();
        let mut combinations: usize = 1;
        for path in &c.cgroups {
            let parts: Vec<&str> = path.split('/').collect();
            let mut prefixes = Vec::new();
            for depth in 1..=parts.len() {
                let prefix = parts.get(..depth).unwrap_or_default().join("/");
                let id = resolve(&prefix)?;
                prefixes.push((u32::try_from(depth).unwrap_or(u32::MAX), prefix, id));
            }
            combinations = combinations.saturating_mul(prefixes.len().max(1));
            cgroups.push(Cgroup { prefixes });
        }
        if combinations > MAX_GATE_RULES {
            return Err(format!(
                "firewall.contain.cgroups: these cgroups are too deep together ({combinations} \
                 combinations of their levels, at most {MAX_GATE_RULES}); contain fewer or \
                 shallower cgroups, or contain by uids or gids"
            ));
        }
        let mut sources: Vec<IpNet> = Vec::new();
        for net in c.sources.iter().map(|n| normalize_net(*n)) {
            if !sources.contains(&net) {
                sources.push(net);
            }
        }
        Ok(Contained {
            uids: c.uids.clone(),
            gids: c.gids.clone(),
            cgroups,
            interfaces: c.interfaces.clone(),
            sources,
        })
    }

    /// `output`: accept what no contained user, group or cgroup sent: one rule per
    /// combination of the cgroups' levels (each rule: every uid and gid differs, and each
    /// cgroup's ancestor at the chosen level differs). Empty when the policy names no process
    /// (validation refuses that with the output hook).
    pub(super) fn local_gate(&self) -> Vec<Rule> {
        let mut base: Vec<Match> = self.uids.iter().map(|&u| Match::SkUidNot(u)).collect();
        base.extend(self.gids.iter().map(|&g| Match::SkGidNot(g)));
        let mut combos: Vec<Vec<Match>> = vec![base];
        for cgroup in &self.cgroups {
            let mut next = Vec::new();
            for combo in &combos {
                for (level, path, id) in &cgroup.prefixes {
                    let mut m = combo.clone();
                    m.push(Match::CgroupNot {
                        level: *level,
                        path: path.clone(),
                        id: *id,
                    });
                    next.push(m);
                }
            }
            combos = next;
        }
        combos
            .into_iter()
            .filter(|m| !m.is_empty())
            .map(|matches| Rule {
                matches,
                verdict: Some(Verdict::Accept),
                dnat: None,
            })
            .collect()
    }

    /// `prerouting` and `input` (`both_ways` false: the source side only) and `forward`
    /// (`both_ways`: to an agent as well as from one): accept what is neither from (nor to) a
    /// contained interface or source. Empty when the policy names no routed agent.
    pub(super) fn routed_gate(&self, both_ways: bool) -> Vec<Rule> {
        if self.interfaces.is_empty() && self.sources.is_empty() {
            return Vec::new();
        }
        let mut ifaces: Vec<Match> = self
            .interfaces
            .iter()
            .map(|i| Match::IifNameNot(i.clone()))
            .collect();
        if both_ways {
            ifaces.extend(self.interfaces.iter().map(|i| Match::OifNameNot(i.clone())));
        }
        let accept = |matches: Vec<Match>| Rule {
            matches,
            verdict: Some(Verdict::Accept),
            dnat: None,
        };
        if self.sources.is_empty() {
            return vec![accept(ifaces)];
        }
        // Addresses are per family: one rule each, the family without sources gated by the
        // interfaces alone (its packets cannot come from a source of the other family). A
        // family with neither gets no gate at all: an agent picks its family, so "no IPv6
        // source named" must keep the agent's IPv6 contained, not hand all of it to the host.
        [Family::V4, Family::V6]
            .into_iter()
            .filter_map(|family| {
                let mut m = Vec::new();
                for net in self
                    .sources
                    .iter()
                    .filter(|n| Family::of(n.addr()) == family)
                {
                    m.push(Match::SaddrNotIn(*net));
                    if both_ways {
                        m.push(Match::DaddrNotIn(*net));
                    }
                }
                if m.is_empty() {
                    if ifaces.is_empty() {
                        return None;
                    }
                    m.push(Match::NfProto(family));
                }
                m.extend(ifaces.iter().cloned());
                Some(accept(m))
            })
            .collect()
    }

    /// Whether the routed gate trusts source addresses, which only the reverse-path check
    /// makes unforgeable: `prerouting` must then run that check before any gate.
    pub(super) fn selects_by_source(&self) -> bool {
        !self.sources.is_empty()
    }
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a unified host, else the
/// first `cgroup2` mount in `/proc/self/mountinfo` (`/sys/fs/cgroup/unified` on a hybrid one).
fn cgroup2_root() -> Result<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo to find cgroup2: {e}"))?;
    let mut mounts = info.lines().filter_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    });
    let all: Vec<PathBuf> = mounts.by_ref().collect();
    all.iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup"))
        .or_else(|| all.first())
        .cloned()
        .ok_or_else(|| {
            "firewall.contain.cgroups: no cgroup2 file system is mounted on this host, so \
             no cgroup can be matched; mount cgroup2 or contain by uids or gids"
                .to_string()
        })
}

/// The id of the cgroup at `path` (relative to the cgroup2 root): the inode number of its
/// directory, which is what the kernel's cgroup id is.
pub(crate) fn cgroup_id(path: &str) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt as _;
    let root = cgroup2_root()?;
    let dir = root.join(path);
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(meta.ino()),
        Ok(_) => Err(format!(
            "firewall.contain.cgroups {path:?}: {} is not a cgroup directory",
            dir.display()
        )),
        Err(e) => Err(format!(
            "firewall.contain.cgroups {path:?}: no such cgroup ({}: {e}); create it (start \
             the service or container first) or remove it from the policy",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contain(uids: &[u32], ifaces: &[&str], sources: &[&str]) -> Contained {
        let c = Contain {
            uids: uids.to_vec(),
            gids: vec![7],
            cgroups: vec!["a/b".into()],
            interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
        };
        Contained::of(&c, &|_| Ok(42)).unwrap()
    }

    #[test]
    fn local_gate_tests_every_level_of_a_cgroup() {
        let c = contain(&[1000, 1001], &[], &[]);
        let rules: Vec<String> = c.local_gate().iter().map(Rule::text).collect();
        assert_eq!(
            rules,
            [
                "meta skuid != 1000 meta skuid != 1001 meta skgid != 7 \
                 socket cgroupv2 level 1 != \"a\" accept",
                "meta skuid != 1000 meta skuid != 1001 meta skgid != 7 \
                 socket cgroupv2 level 2 != \"a/b\" accept",
            ]
        );
        assert!(c.routed_gate(true).is_empty());
        let deep = Contain {
            cgroups: vec!["a/b/c/d/e/f/g/h".into(), "x/y/z/w/v/u/t/s/r".into()],
            ..Contain::default()
        };
        assert!(Contained::of(&deep, &|_| Ok(1)).is_err());
    }

    #[test]
    fn routed_gate_is_per_family_with_sources() {
        let c = contain(&[], &["veth*"], &["10.77.0.0/24"]);
        let rules: Vec<String> = c.routed_gate(true).iter().map(Rule::text).collect();
        assert_eq!(
            rules,
            [
                "ip saddr != 10.77.0.0/24 ip daddr != 10.77.0.0/24 iifname != \"veth*\" \
                 oifname != \"veth*\" accept",
                "meta nfproto ipv6 iifname != \"veth*\" oifname != \"veth*\" accept",
            ]
        );
        let c = contain(&[], &["to-a1"], &[]);
        let rules: Vec<String> = c.routed_gate(false).iter().map(Rule::text).collect();
        assert_eq!(rules, ["iifname != \"to-a1\" accept"]);
    }

    #[test]
    fn a_family_with_no_source_and_no_interface_gets_no_gate() {
        let c = contain(&[], &[], &["10.77.0.0/24"]);
        let rules: Vec<String> = c.routed_gate(true).iter().map(Rule::text).collect();
        assert_eq!(
            rules,
            ["ip saddr != 10.77.0.0/24 ip daddr != 10.77.0.0/24 accept"]
        );
        assert!(c.selects_by_source());
        let c = contain(&[], &[], &["fd77::/64"]);
        let rules: Vec<String> = c.routed_gate(false).iter().map(Rule::text).collect();
        assert_eq!(rules, ["ip6 saddr != fd77::/64 accept"]);
    }

    #[test]
    fn a_missing_cgroup_is_a_clear_error() {
        let e = cgroup_id("dnsfence-no-such-cgroup/x").unwrap_err();
        assert!(e.contains("dnsfence-no-such-cgroup/x"), "{e}");
    }
}
