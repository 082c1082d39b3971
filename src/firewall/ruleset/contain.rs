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
//! Cgroups are where the kernel offers only ids: `socket cgroupv2 level N` loads the id of the
//! socket's ancestor N levels below the root (the inode number of its directory in the
//! cgroup2 file system), and for a socket in a shallower cgroup the expression does not match
//! at all. Ids are not paths: a cgroup deleted and re-created (`systemctl restart`, a container
//! restart) gets a new one. A gate "accept if the ancestor is not *this id*" would therefore
//! hand a re-created agent cgroup to the host until someone noticed (fail open), and nftables
//! has no way to compare a path. So the gate is the other way round: **contain by default and
//! accept the known-uncontained**. For each level of the contained paths there is a set of
//! cgroup ids (`outside_cgroupsN`) holding the cgroups that branch off the contained paths at
//! that level (for `system.slice/agent.service`: every other top-level cgroup at level 1,
//! every other child of `system.slice` at level 2), and one gate rule per level accepts a
//! socket whose ancestor there is in the set. A cgroup nobody has seen yet (the re-created
//! agent, but also a sibling service started a moment ago) is in no set and stays contained
//! until the firewall's cgroup watch (`firewall::cgroup_watch`, every `CGROUP_POLL`) has
//! listed it; a re-created agent cgroup is never
//! listed, so it is contained from its first packet. What cannot be told apart (the root
//! cgroup, the contained paths' own ancestors) stays contained, as before.
//!
//! Why one set per level suffices for several contained cgroups: the contained paths form a
//! tree (pruned below a contained cgroup). A socket's cgroup is outside every contained one
//! exactly when, walking down from the root, it leaves that tree at some level before
//! reaching a contained node; the cgroup where it leaves is a child of a tree node that is not
//! itself on the tree: the level's set holds exactly those.

use std::collections::BTreeSet;
use std::os::unix::fs::DirEntryExt as _;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::build::normalize_net;
use super::model::{CgroupSetDef, Family, Match, Rule, Verdict};
use super::subids::{self, Subordinate};
use crate::policy::Contain;

/// The contained cgroup paths as a tree, and what to list to find the cgroups outside them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupPlan {
    /// The contained paths, without those below another contained path (already covered).
    contained: Vec<String>,
    /// Every prefix of a contained path (the contained paths included): never "outside".
    on_tree: BTreeSet<String>,
    /// The tree's inner nodes (strict prefixes, the root `""` first) with their depth: their
    /// children that are not on the tree are the cgroups outside, at depth + 1.
    inner: Vec<(u32, String)>,
    /// The deepest contained path's depth: the number of sets and gate rules.
    levels: u32,
}

/// The cgroups found outside the contained ones, by level, and the contained cgroups that do
/// not exist right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Outside {
    /// Index 0: level 1. Cgroup ids (inode numbers of their directories).
    pub(crate) by_level: Vec<BTreeSet<u64>>,
    /// Contained paths with no cgroup directory (not started yet, or between a stop and a
    /// start): nothing can be in them, and whatever is created there later is contained.
    pub(crate) missing: Vec<String>,
    /// A level had more cgroups than its set holds: the rest stay contained.
    pub(crate) truncated: bool,
}

impl Outside {
    /// The ids at `level` (1-based).
    pub(crate) fn ids_at(&self, level: u32) -> Option<&BTreeSet<u64>> {
        self.by_level.get((level as usize).checked_sub(1)?)
    }
}

impl CgroupPlan {
    pub(crate) fn of(paths: &[String]) -> CgroupPlan {
        let mut sorted: Vec<&str> = paths.iter().map(String::as_str).collect();
        // Shorter first, so a path below an already contained one is seen to be covered.
        sorted.sort_by_key(|p| (p.split('/').count(), *p));
        sorted.dedup();
        let mut contained: Vec<String> = Vec::new();
        for path in sorted {
            let covered = contained.iter().any(|c| {
                path.strip_prefix(c.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            });
            if !covered {
                contained.push(path.to_string());
            }
        }
        let mut on_tree = BTreeSet::new();
        let mut inner = BTreeSet::new();
        let mut levels = 0;
        for path in &contained {
            let parts: Vec<&str> = path.split('/').collect();
            levels = levels.max(u32::try_from(parts.len()).unwrap_or(u32::MAX));
            inner.insert((0u32, String::new()));
            for depth in 1..=parts.len() {
                let prefix = parts.get(..depth).unwrap_or_default().join("/");
                if depth < parts.len() {
                    inner.insert((u32::try_from(depth).unwrap_or(u32::MAX), prefix.clone()));
                }
                on_tree.insert(prefix);
            }
        }
        CgroupPlan {
            contained,
            on_tree,
            inner: inner.into_iter().collect(),
            levels,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.contained.is_empty()
    }

    /// The sets the gate needs: one per level of the deepest contained path.
    pub(crate) fn sets(&self) -> Vec<CgroupSetDef> {
        (1..=self.levels)
            .map(|level| CgroupSetDef { level })
            .collect()
    }

    /// Lists the cgroups outside the contained ones below `root` (the cgroup2 mount): the
    /// children of the tree's inner nodes that are not on the tree. One `readdir` per inner
    /// node (the directory entry carries the inode number, which is the cgroup id) and one
    /// `stat` per contained path: microseconds, bounded by the sets' size.
    pub(crate) fn outside(&self, root: &Path) -> Outside {
        let mut out = Outside {
            by_level: vec![BTreeSet::new(); self.levels as usize],
            ..Outside::default()
        };
        for (depth, node) in &self.inner {
            let Ok(entries) = std::fs::read_dir(root.join(node)) else {
                // A missing inner node: nothing below it exists, so nothing to accept.
                continue;
            };
            let Some(set) = out.by_level.get_mut(*depth as usize) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let child = if node.is_empty() {
                    name.into_owned()
                } else {
                    format!("{node}/{name}")
                };
                if self.on_tree.contains(&child) {
                    continue;
                }
                if set.len() >= CgroupSetDef::SIZE as usize {
                    out.truncated = true;
                    break;
                }
                set.insert(entry.ino());
            }
        }
        out.missing = self
            .contained
            .iter()
            .filter(|p| !root.join(p).is_dir())
            .cloned()
            .collect();
        out
    }
}

/// `firewall.contain`, ready to build gates from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Contained {
    uids: Vec<u32>,
    gids: Vec<u32>,
    /// The ranges `/etc/subuid` and `/etc/subgid` grant the contained uids (see `subids`).
    subordinate: Subordinate,
    cgroups: CgroupPlan,
    interfaces: Vec<String>,
    sources: Vec<IpNet>,
}

impl Contained {
    pub(super) fn of(c: &Contain) -> Contained {
        let mut sources: Vec<IpNet> = Vec::new();
        for net in c.sources.iter().map(|n| normalize_net(*n)) {
            if !sources.contains(&net) {
                sources.push(net);
            }
        }
        Contained {
            uids: c.uids.clone(),
            gids: c.gids.clone(),
            subordinate: Subordinate::default(),
            cgroups: CgroupPlan::of(&c.cgroups),
            interfaces: c.interfaces.clone(),
            sources,
        }
    }

    /// Reads the subordinate ids the files in `dir` grant the contained uids, now: a range
    /// added later is contained from the next build of the ruleset (start or reload).
    pub(super) fn with_subordinate_ids(mut self, dir: &Path) -> Result<Contained, String> {
        self.subordinate = subids::read(dir, &subids::owners(&self.uids))?;
        Ok(self)
    }

    /// What the subordinate ids add, for the start-up line (empty: nothing).
    pub(super) fn subordinate_summary(&self) -> String {
        self.subordinate.summary()
    }

    /// The cgroup sets the `output` gate looks up (none without `cgroups`).
    pub(super) fn cgroup_sets(&self) -> Vec<CgroupSetDef> {
        self.cgroups.sets()
    }

    /// `output`: accept what no contained user, group or cgroup sent. Without cgroups one
    /// rule (every uid and gid differs); with them one rule per level (every uid and gid
    /// differs, and the socket's ancestor at that level is a cgroup known to be outside).
    /// Empty when the policy names no process (validation refuses that with the output hook).
    pub(super) fn local_gate(&self) -> Vec<Rule> {
        let mut base: Vec<Match> = self.uids.iter().map(|&u| Match::SkUidNot(u)).collect();
        base.extend(self.subordinate.uids.iter().map(|&r| Match::SkUidNotIn(r)));
        base.extend(self.gids.iter().map(|&g| Match::SkGidNot(g)));
        base.extend(self.subordinate.gids.iter().map(|&r| Match::SkGidNotIn(r)));
        let accept = |matches: Vec<Match>| Rule {
            matches,
            verdict: Some(Verdict::Accept),
            dnat: None,
        };
        if self.cgroups.is_empty() {
            return if base.is_empty() {
                Vec::new()
            } else {
                vec![accept(base)]
            };
        }
        self.cgroups
            .sets()
            .into_iter()
            .map(|set| {
                let mut m = base.clone();
                m.push(Match::CgroupOutside { level: set.level });
                accept(m)
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

/// Where the cgroup v2 hierarchy is mounted, for the cgroup watch.
pub(crate) fn cgroup_root() -> Result<PathBuf, String> {
    cgroup2_root()
}

/// What this host says about `contain.cgroups`, for `check` and `serve` alike: an error when
/// no cgroup2 hierarchy is mounted (no cgroup could ever be matched, so every process would
/// stay contained), a warning for each contained cgroup that does not exist now (it is
/// contained from the moment it is created; dnsfence waits for it).
pub(crate) fn cgroup_host_warnings(paths: &[String]) -> Result<Vec<String>, String> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let root = cgroup2_root()?;
    let outside = CgroupPlan::of(paths).outside(&root);
    Ok(outside
        .missing
        .iter()
        .map(|p| missing_cgroup_message(p, &root))
        .collect())
}

/// What this host says about `contain.interfaces`, for `check` and `serve` alike: a warning
/// for each entry that names a port of a bridge (`/sys/class/net/<if>/master` is a bridge).
/// Routed traffic from a bridge port enters the IP layer on the bridge, so `iifname` is the
/// bridge's name in `prerouting`, `input` and `forward`: an entry naming the port never
/// matches, and the agent behind it is handed to the host. A wildcard is checked against the
/// interfaces it matches now. Interfaces are those of the network namespace this runs in.
pub(crate) fn interface_host_warnings(names: &[String], sys_class_net: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut present: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let bridge_of = |port: &str| -> Option<String> {
        let master = std::fs::read_link(sys_class_net.join(port).join("master")).ok()?;
        let master = master.file_name()?.to_string_lossy().into_owned();
        sys_class_net
            .join(&master)
            .join("bridge")
            .is_dir()
            .then_some(master)
    };
    let mut out = Vec::new();
    for entry in names {
        let ports: Vec<(String, String)> = present
            .iter()
            .filter(|name| match entry.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => *name == entry,
            })
            .filter_map(|name| bridge_of(name).map(|b| (name.clone(), b)))
            .collect();
        let Some((port, bridge)) = ports.first() else {
            continue;
        };
        let which = if entry.ends_with('*') {
            format!("matches {port} (and {} more ports)", ports.len() - 1)
        } else {
            format!("is {port}")
        };
        out.push(format!(
            "firewall.contain.interfaces {entry:?} {which}, a port of the bridge {bridge:?}: \
             routed traffic from a bridge port enters on the bridge (prerouting, input and \
             forward see iifname {bridge:?}, not the port), so this entry never matches and the \
             agents behind it are not contained; name the bridge ({bridge}) instead, with \
             sources to tell agents on one bridge apart"
        ));
    }
    out
}

/// The words for a contained cgroup that does not exist (start-up, `check`, the watch).
pub(crate) fn missing_cgroup_message(path: &str, root: &Path) -> String {
    format!(
        "firewall.contain.cgroups {path:?}: no such cgroup on this host yet ({} does not \
         exist); it is contained as soon as it is created (start the service or container), \
         but check the path if you expected it to exist",
        root.join(path).display()
    )
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
            ..Contain::default()
        };
        Contained::of(&c)
    }

    #[test]
    fn local_gate_accepts_known_outside_cgroups_level_by_level() {
        let c = contain(&[1000, 1001], &[], &[]);
        let rules: Vec<String> = c.local_gate().iter().map(Rule::text).collect();
        assert_eq!(
            rules,
            [
                "meta skuid != 1000 meta skuid != 1001 meta skgid != 7 \
                 socket cgroupv2 level 1 @outside_cgroups1 accept",
                "meta skuid != 1000 meta skuid != 1001 meta skgid != 7 \
                 socket cgroupv2 level 2 @outside_cgroups2 accept",
            ]
        );
        assert_eq!(c.cgroup_sets().len(), 2);
        assert!(c.routed_gate(true).is_empty());
        // Deep paths cost one rule per level, not a product of levels.
        let deep = Contain {
            cgroups: vec!["a/b/c/d/e/f/g/h".into(), "x/y/z/w/v/u/t/s/r".into()],
            ..Contain::default()
        };
        assert_eq!(Contained::of(&deep).local_gate().len(), 9);
    }

    #[test]
    fn a_plan_lists_the_siblings_of_the_contained_paths_only() {
        let dir = std::env::temp_dir().join(format!("dnsf-cgplan-{}", std::process::id()));
        for d in [
            "system.slice/agent.service/child",
            "system.slice/other.service",
            "system.slice/agent2.service",
            "user.slice/user-1000.slice",
            "init.scope",
            "deep/x/y",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("system.slice/cgroup.procs"), "").unwrap();
        let ino = |p: &str| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir.join(p)).unwrap().ino()
        };
        let plan = CgroupPlan::of(&[
            "system.slice/agent.service".into(),
            "system.slice/agent.service/child".into(), // covered by its parent
            "system.slice/agent2.service".into(),
            "system.slice/gone.service".into(),
        ]);
        assert_eq!(plan.sets().len(), 2);
        let out = plan.outside(&dir);
        let l1: BTreeSet<u64> = ["user.slice", "init.scope", "deep"].map(ino).into();
        let l2: BTreeSet<u64> = [ino("system.slice/other.service")].into();
        assert_eq!(out.by_level, vec![l1, l2]);
        assert_eq!(out.missing, ["system.slice/gone.service"]);
        assert!(!out.truncated);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn local_gate_contains_the_subordinate_ids_of_contained_users() {
        let dir = std::env::temp_dir().join(format!("dnsfence-gate-subids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("subuid"), "1000:100000:65536\n1001:200000:10\n").unwrap();
        std::fs::write(dir.join("subgid"), "1000:100000:65536\n").unwrap();
        let c = Contain {
            uids: vec![1000],
            ..Contain::default()
        };
        let gate = Contained::of(&c).with_subordinate_ids(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let rules: Vec<String> = gate.local_gate().iter().map(Rule::text).collect();
        assert_eq!(
            rules,
            ["meta skuid != 1000 meta skuid != 100000-165535 meta skgid != 100000-165535 accept"]
        );
        assert_eq!(
            gate.subordinate_summary(),
            "subuids 100000-165535; subgids 100000-165535"
        );
        // As `nft --debug=netlink` encodes `meta skuid != 100000-165535`.
        let exprs = gate.local_gate()[0].exprs();
        assert_eq!(
            exprs[2..5],
            [
                crate::firewall::ruleset::Expr::Meta {
                    key: crate::firewall::ruleset::MetaKey::SkUid,
                    dreg: 1
                },
                crate::firewall::ruleset::Expr::HostToBig32,
                crate::firewall::ruleset::Expr::RangeNeq {
                    from: vec![0x00, 0x01, 0x86, 0xa0],
                    to: vec![0x00, 0x02, 0x86, 0x9f],
                },
            ]
        );
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
    fn an_interface_enslaved_to_a_bridge_is_named_with_its_bridge() {
        // A stand-in for /sys/class/net: br0 is a bridge, veth1 and veth2 its ports, bond0 a
        // bond (not a bridge) with port eth1, eth0 on its own.
        let dir = std::env::temp_dir().join(format!("dnsf-sysnet-{}", std::process::id()));
        for d in ["br0/bridge", "veth1", "veth2", "bond0", "eth1", "eth0"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for (port, master) in [("veth1", "br0"), ("veth2", "br0"), ("eth1", "bond0")] {
            std::os::unix::fs::symlink(format!("../{master}"), dir.join(port).join("master"))
                .unwrap();
        }
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let w = interface_host_warnings(&names(&["veth1", "eth0", "eth1", "br0", "nope"]), &dir);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].starts_with(
                "firewall.contain.interfaces \"veth1\" is veth1, a port of the bridge \"br0\""
            ) && w[0].contains("name the bridge (br0) instead"),
            "{}",
            w[0]
        );
        let w = interface_host_warnings(&names(&["veth*"]), &dir);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].contains("matches veth1 (and 1 more ports)"),
            "{}",
            w[0]
        );
        assert!(interface_host_warnings(&names(&["eth*", "br*"]), &dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_cgroup_is_a_warning_not_an_error() {
        let w = cgroup_host_warnings(&["dnsfence-no-such-cgroup/x".into()]).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("dnsfence-no-such-cgroup/x"), "{w:?}");
    }
}
