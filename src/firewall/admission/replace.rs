//! Replacing the ruleset while dnsfence runs, carrying over the elements that are still
//! justified.
//!
//! A reload that changes the firewall's shape (hooks, `per_client`, `allow_cidrs`, `contain`,
//! `inbound`), or a cgroup that was re-created under a new id, needs a new table. It is
//! installed in ONE transaction: delete the old table, create the new one, and add the elements
//! that are carried over with what is left of their lifetimes. nf_tables commits a batch as
//! one generation, so no packet sees a moment without a table, and if the kernel refuses any
//! part of it nothing changes: the old table keeps filtering and the thread keeps admitting
//! into it.
//!
//! It runs on the admission thread, through the same queue as admissions and revocations, for
//! two reasons: the thread owns the lifetime map (what each element was granted until), which
//! is both the source of the remaining timeouts and what must be rebuilt for the new sets; and
//! an admission queued before the replacement lands in the old sets and is carried over (or
//! not) like every other element, while one queued after it lands in the new sets. No element
//! slips between the two.
//!
//! Which elements are carried over ([`Carry`]):
//!
//! * `All`: every live element, same key (the policy did not change, only something the
//!   ruleset was built from, such as a cgroup's id). With `per_client` changed there is no way
//!   to tell which client an address in the shared set was for: nothing is carried then.
//! * `Justified`: only the (client, address) pairs that the caller judged again under the new
//!   policy and still found justified. An element's new lifetime is the shorter of what the
//!   kernel had left and the latest expiry among its surviving justifications (a longer
//!   lifetime that came from a revoked name is not carried). When `per_client` is switched on,
//!   a shared element becomes one element per client that still has a justification for it;
//!   switched off, the per-client elements of an address merge into one with the longest
//!   lifetime. Elements the lifetime map does not know (admitted before a restart that kept
//!   the table) are not carried: they are not in the admission index, nothing can vouch for
//!   them; the next query for their name admits them again.
//!
//! Connections are not cut here: what the new policy revoked is cut by the revocation pass
//! that follows the swap of the policy (`control`), which knows which justifications were lost.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ipnet::IpNet;
use tokio::sync::oneshot;

use super::{Admission, BYTES_PER_ELEM, Key, Lifetimes, millis};
use crate::firewall::cgroup_watch::SharedPlan;
use crate::firewall::netlink::Elem;
use crate::firewall::ruleset::{BridgeLayout, Family, Layout, Verdict, element_key, normalize_ip};
use crate::firewall::{FirewallError, bridge, cgroup_watch, compare, conntrack, firewall_error};
use crate::policy::Policy;

/// Which elements a replacement carries over into the new sets.
#[derive(Debug, Clone)]
pub enum Carry {
    /// Every live element (the same policy; the ruleset changed for another reason).
    All,
    /// Per destination address, the clients that are still justified in reaching it and until
    /// when (the latest expiry of their surviving justifications).
    Justified(HashMap<IpAddr, Vec<(IpAddr, Instant)>>),
}

/// What a replacement did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    /// False when the kernel's table already had the new layout: nothing was replaced.
    pub changed: bool,
    /// Elements in the new sets.
    pub carried: usize,
    /// Live elements of the old sets that were not carried over.
    pub dropped: usize,
    /// The hooks whose chains drop what no rule accepts, in the new table.
    pub drop_hooks: Vec<&'static str>,
    /// Connections cut into `allow_cidrs` ranges the new policy removed.
    pub connections: usize,
    /// Why those connections could not be cut, if they could not (the ruleset is replaced).
    pub cut_error: Option<String>,
}

pub(crate) struct ReplaceRequest {
    pub(crate) policy: Arc<Policy>,
    pub(crate) carry: Carry,
    /// `allow_cidrs` ranges the new policy no longer has: once the new table is in, the
    /// connections into them are cut (unless the new ranges or a carried element still
    /// allow them). Empty with `revoke.connections: keep`.
    pub(crate) cut_ranges: Vec<IpNet>,
    /// What the cgroup watch lists: swapped for the new policy's `contain.cgroups` in the
    /// same step as the commit (see `cgroup_watch::SharedPlan`), left alone on failure.
    pub(crate) cgroups: SharedPlan,
    pub(crate) reply: oneshot::Sender<Result<Replaced, FirewallError>>,
}

/// The hooks whose chains default to drop.
pub(crate) fn drop_hooks(layout: &Layout) -> Vec<&'static str> {
    layout
        .chains
        .iter()
        .filter(|c| c.policy() == Verdict::Drop)
        .map(|c| c.hook.name())
        .collect()
}

/// The elements of the new sets: (key in the new sets' shape, expiry), longest-lived first.
/// `old` holds the live entries of the lifetime map, keyed in the old shape.
pub(crate) fn carried_elements(
    old: &[(Key, Instant)],
    carry: &Carry,
    per_client_before: bool,
    per_client_after: bool,
    now: Instant,
) -> Vec<(Key, Instant)> {
    let mut next: HashMap<Key, Instant> = HashMap::new();
    let mut keep = |key: Key, expiry: Instant| {
        if expiry <= now {
            return;
        }
        let e = next.entry(key).or_insert(expiry);
        *e = (*e).max(expiry);
    };
    for &((client, addr), expiry) in old {
        match carry {
            Carry::All => {
                if per_client_before == per_client_after {
                    keep((client, addr), expiry);
                }
            }
            Carry::Justified(justified) => {
                let Some(clients) = justified.get(&addr) else {
                    continue;
                };
                match (client, per_client_after) {
                    // Per client before (and after, or merged into the shared set): that
                    // client's own justifications.
                    (Some(c), _) => {
                        let until = clients
                            .iter()
                            .filter(|(who, _)| normalize_ip(*who) == c)
                            .map(|(_, until)| *until)
                            .max();
                        if let Some(until) = until {
                            keep((per_client_after.then_some(c), addr), expiry.min(until));
                        }
                    }
                    // Shared before and after: anyone's.
                    (None, false) => {
                        if let Some(until) = clients.iter().map(|(_, until)| *until).max() {
                            keep((None, addr), expiry.min(until));
                        }
                    }
                    // Shared before, per client after: one element per justified client.
                    (None, true) => {
                        for &(who, until) in clients {
                            let who = normalize_ip(who);
                            if Family::of(who) == Family::of(addr) {
                                keep((Some(who), addr), expiry.min(until));
                            }
                        }
                    }
                }
            }
        }
    }
    let mut carried: Vec<(Key, Instant)> = next.into_iter().collect();
    carried.sort_by_key(|c| std::cmp::Reverse(c.1));
    carried
}

impl Admission {
    pub(super) fn replace(&mut self, request: ReplaceRequest) {
        let result = self.try_replace(
            &request.policy,
            &request.carry,
            &request.cut_ranges,
            &request.cgroups,
        );
        let _ = request.reply.send(result);
    }

    fn try_replace(
        &mut self,
        policy: &Policy,
        carry: &Carry,
        cut_ranges: &[IpNet],
        cgroups: &SharedPlan,
    ) -> Result<Replaced, FirewallError> {
        let fw = &policy.firewall;
        let layout = Layout::from_policy(policy).map_err(FirewallError::Policy)?;
        if layout.table != self.cfg.table {
            return Err(FirewallError::Policy(format!(
                "firewall.table changed from {} to {}: a restart is needed",
                self.cfg.table, layout.table
            )));
        }
        // From here to the end the cgroup watch waits: the cgroups outside the new plan's
        // contained ones are listed, committed and the plan swapped as one step.
        let plan = cgroup_watch::plan_of(policy).map_err(FirewallError::Policy)?;
        let mut watched = cgroup_watch::lock_plan(cgroups);
        let outside = plan
            .as_ref()
            .map(|(plan, root)| plan.outside(root))
            .unwrap_or_default();
        let table = layout.table.clone();
        let err = |e| firewall_error(e, &table, Some(&layout));
        let existing = self.sock.read_table(&table).map_err(err)?;
        // firewall.bind: the bridge table changes in the same transaction as the main one, or
        // alone when only it changed (the main table and its elements stay as they are).
        let bridge_want = BridgeLayout::from_policy(policy);
        let bridge_plan = bridge::BridgePlan::read(&mut self.sock, &table).map_err(err)?;
        let per_client = fw.per_client;
        let share = fw.elements_per_client().clamp(1, self.cfg.set_size.max(1));
        let now = Instant::now();
        let unchanged = per_client == self.cfg.per_client
            && existing
                .as_ref()
                .is_some_and(|k| compare::compare(&layout, k).is_ok());
        if unchanged {
            // The same layout can contain other cgroups (same depth): bring the sets to the
            // new plan now rather than at the watch's next poll, which would leave a cgroup
            // this reload contains outside until then.
            if *watched != plan {
                cgroup_watch::sync(&mut self.sock, &table, &layout.cgroup_sets, &outside)
                    .map_err(err)?;
                *watched = plan;
            }
            let mut batch = self.sock.begin(&table);
            let bridge_changed = bridge_plan.add_to(&mut batch, bridge_want.as_ref());
            if bridge_changed {
                self.sock.commit(batch).map_err(err)?;
                if let Err(why) = bridge::read_back(&mut self.sock, &table, bridge_want.as_ref()) {
                    tracing::error!(target: "dnsfence::firewall", table = %table, %why, "the replaced bridge table does not read back as built");
                }
                tracing::info!(target: "dnsfence::firewall", table = %table, "replaced the bridge table (firewall.bind); the main table is unchanged");
            }
            self.cfg.client_share = share;
            let [v4, v6] = self.lifetimes.live(now);
            return Ok(Replaced {
                changed: bridge_changed,
                carried: v4 + v6,
                dropped: 0,
                drop_hooks: drop_hooks(&layout),
                connections: 0,
                cut_error: None,
            });
        }

        let old: Vec<(Key, Instant)> = self
            .lifetimes
            .maps
            .iter()
            .flat_map(|m| m.iter().map(|(k, e)| (*k, *e)))
            .filter(|(_, e)| *e > now)
            .collect();
        let mut carried = carried_elements(&old, carry, self.cfg.per_client, per_client, now);
        // The whole transaction must fit in one sendmsg; the layout takes a few kilobytes.
        // What does not fit is not carried (the longest-lived are): fail closed, and the next
        // query for those names admits them again.
        let room = (self.sock.max_batch_bytes().saturating_sub(256 << 10)) / BYTES_PER_ELEM;
        let set_size = self.cfg.set_size as usize;
        let mut per_family = [0usize; 2];
        let mut total = 0usize;
        carried.retain(|(key, _)| {
            let Some(n) = per_family.get_mut(super::slot(key.1)) else {
                return false;
            };
            if *n >= set_size || total >= room {
                return false;
            }
            *n += 1;
            total += 1;
            true
        });
        if total >= room {
            tracing::warn!(
                target: "dnsfence::firewall",
                room,
                "more elements than one transaction takes: the rest are not carried over into \
                 the new ruleset (admitted again on their next query)"
            );
        }
        let keyed: Vec<(Family, Vec<u8>, u64)> = carried
            .iter()
            .filter_map(|((client, addr), expiry)| {
                let left = expiry.saturating_duration_since(now);
                let bytes = element_key(per_client, client.unwrap_or(*addr), *addr)?;
                Some((Family::of(*addr), bytes, millis(left)))
            })
            .collect();
        let mut batch = self.sock.begin(&table);
        if existing.is_some() {
            batch.del_table();
        }
        batch.add_layout(&layout);
        // The cgroups known to be outside the contained ones, in the same transaction (as at
        // install): the host's other processes never meet the gate's default. The cgroup
        // watch keeps them current from here on (it notices the new table's handle).
        for (set, keys) in cgroup_watch::keys_of(&layout.cgroup_sets, &outside) {
            batch.add_keys(set, &keys);
        }
        bridge_plan.add_to(&mut batch, bridge_want.as_ref());
        for family in [Family::V4, Family::V6] {
            let elems: Vec<Elem<'_>> = keyed
                .iter()
                .filter(|(f, ..)| *f == family)
                .map(|(_, key, timeout_ms)| Elem {
                    key,
                    timeout_ms: *timeout_ms,
                })
                .collect();
            if !elems.is_empty() {
                batch.add_elements(family.set_name(), &elems);
            }
        }
        self.sock.commit(batch).map_err(err)?;
        *watched = plan;
        drop(watched);

        // Committed: from here on the thread admits into the new sets, and the cgroup watch
        // lists the new plan's cgroups.
        self.cfg.per_client = per_client;
        self.cfg.client_share = share;
        self.shared_per_client.store(per_client, Ordering::Release);
        let mut lifetimes = Lifetimes::new(self.cfg.set_size as usize);
        for (key, expiry) in &carried {
            lifetimes.record(*key, *expiry, now);
        }
        self.lifetimes = lifetimes;
        // Acknowledgements of the old sets' elements say nothing about the new sets.
        if let Ok(mut acked) = self.confirmed.acked.lock() {
            acked.map.clear();
        }
        // Read back: the kernel holds what was asked for.
        if let Err(why) = bridge::read_back(&mut self.sock, &table, bridge_want.as_ref()) {
            tracing::error!(target: "dnsfence::firewall", table = %table, %why, "the replaced bridge table does not read back as built");
        }
        match self.sock.read_table(&table) {
            Ok(Some(k)) => {
                if let Err(why) = compare::compare(&layout, &k) {
                    tracing::error!(target: "dnsfence::firewall", table = %table, %why, "the replaced table does not read back as built");
                }
            }
            Ok(None) => {
                tracing::error!(target: "dnsfence::firewall", table = %table, "the replaced table is gone")
            }
            Err(error) => {
                tracing::warn!(target: "dnsfence::firewall", %error, "cannot read back the replaced table")
            }
        }
        let (connections, cut_error) = if cut_ranges.is_empty() {
            (0, None)
        } else {
            let kept: std::collections::HashSet<Key> = carried.iter().map(|(k, _)| *k).collect();
            let still = &fw.allow_cidrs;
            let wanted = |src: IpAddr, dst: IpAddr| {
                let (src, dst) = (normalize_ip(src), normalize_ip(dst));
                cut_ranges.iter().any(|r| r.contains(&dst))
                    && !still.iter().any(|r| r.contains(&dst))
                    && !kept.contains(&(None, dst))
                    && !kept.contains(&(Some(src), dst))
            };
            match conntrack::cut_matching(wanted) {
                Ok(n) => (n, None),
                Err(error) => {
                    tracing::error!(target: "dnsfence::firewall", %error, "replaced the ruleset, but could not cut the connections into removed allow_cidrs");
                    (0, Some(error))
                }
            }
        };
        let dropped = old.len().saturating_sub(carried.len());
        tracing::info!(
            target: "dnsfence::firewall",
            table = %table,
            carried = carried.len(),
            dropped,
            per_client,
            "replaced the nftables table, carrying over the elements still justified"
        );
        Ok(Replaced {
            changed: true,
            carried: carried.len(),
            dropped,
            drop_hooks: drop_hooks(&layout),
            connections,
            cut_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_justified_pairs_are_carried_and_at_most_as_long_as_their_justification() {
        let now = Instant::now();
        let later = |s: u64| now + Duration::from_secs(s);
        let old = vec![
            ((None, ip("198.51.100.1")), later(3600)),
            ((None, ip("198.51.100.2")), later(60)),
            ((None, ip("198.51.100.3")), later(60)),
        ];
        let mut justified = HashMap::new();
        // Still justified, but only by a 100 s answer: the 3600 s lifetime came from a name
        // the new policy dropped.
        justified.insert(ip("198.51.100.1"), vec![(ip("10.0.0.7"), later(100))]);
        justified.insert(ip("198.51.100.2"), vec![(ip("10.0.0.7"), later(100))]);
        let carry = Carry::Justified(justified);
        let shared = carried_elements(&old, &carry, false, false, now);
        assert_eq!(
            shared,
            vec![
                ((None, ip("198.51.100.1")), later(100)),
                ((None, ip("198.51.100.2")), later(60)),
            ]
        );
        // Switched to per client: one element per client that resolved it.
        let per_client = carried_elements(&old, &carry, false, true, now);
        assert!(per_client.contains(&((Some(ip("10.0.0.7")), ip("198.51.100.1")), later(100))));
        assert_eq!(per_client.len(), 2);
        // Without index information a shared set cannot be split per client.
        assert!(carried_elements(&old, &Carry::All, false, true, now).is_empty());
        assert_eq!(
            carried_elements(&old, &Carry::All, false, false, now).len(),
            3
        );
    }

    #[test]
    fn per_client_elements_merge_into_the_longest_when_switched_off() {
        let now = Instant::now();
        let later = |s: u64| now + Duration::from_secs(s);
        let a = ip("198.51.100.1");
        let old = vec![
            ((Some(ip("10.0.0.7")), a), later(50)),
            ((Some(ip("10.0.0.8")), a), later(90)),
            ((Some(ip("10.0.0.9")), a), later(500)),
        ];
        let mut justified = HashMap::new();
        // 10.0.0.9's name was removed: its longer lifetime is not carried.
        justified.insert(
            a,
            vec![(ip("10.0.0.7"), later(50)), (ip("10.0.0.8"), later(90))],
        );
        let carried = carried_elements(&old, &Carry::Justified(justified), true, false, now);
        assert_eq!(carried, vec![((None, a), later(90))]);
    }
}
