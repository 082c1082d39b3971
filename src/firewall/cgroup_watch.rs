//! The cgroup watch: keeps the `outside_cgroupsN` sets equal to the cgroups that are outside
//! every contained one, as the host creates and deletes cgroups.
//!
//! The `output` gate accepts a socket only when its cgroup is *known* to be outside (see
//! `ruleset::contain`): the sets are the list of the known. This thread lists the cgroup2
//! directories along the contained paths every [`CGROUP_POLL`] and, when the list changed,
//! adds and deletes ids in one nf_tables transaction (all or nothing, like every change
//! dnsfence makes). Nothing here can open a hole for the agent: a re-created agent cgroup is
//! on the contained path, so it is never listed, and it is contained from its first packet.
//! What waits for the next poll is the host's side: a service started a moment ago beside the
//! agent stays contained (its DNS answered by dnsfence, its other egress dropped) for up to
//! one poll. A poll that finds the same cgroups and the same table (its handle: a table
//! replaced by a reload has a new one) changes nothing; otherwise, and every [`FULL_SYNC`]
//! anyway, the sets are read back from the kernel and corrected.
//!
//! Cost, measured on this machine: one `readdir` per inner node of the contained paths, one
//! `stat` per contained path and one netlink dump per set: well under a millisecond per poll
//! for a host with a few hundred services (see the README).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netlink::{Batch, NfSocket, NlError};
use super::ruleset::{
    CgroupPlan, CgroupSetDef, Layout, Outside, cgroup_root, missing_cgroup_message,
};
use crate::policy::Policy;

/// How often the cgroups are listed: how long a cgroup created beside a contained one waits
/// before the host's own firewall decides about it again.
pub const CGROUP_POLL: Duration = Duration::from_millis(500);

/// The sets are read back from the kernel at least this often even when nothing seems to
/// have changed (someone flushed a set by hand).
const FULL_SYNC: Duration = Duration::from_secs(10);

/// The stop flag is checked this often while waiting for the next poll.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Makes the kernel's cgroup sets hold exactly `want`, in one transaction; returns how many
/// ids were added and deleted.
pub(super) fn sync(
    sock: &mut NfSocket,
    table: &str,
    sets: &[CgroupSetDef],
    want: &Outside,
) -> Result<(usize, usize), NlError> {
    let mut batch = sock.begin(table);
    let (mut added, mut deleted) = (0, 0);
    let empty = BTreeSet::new();
    for set in sets {
        let want = want.ids_at(set.level).unwrap_or(&empty);
        let have: BTreeSet<u64> = sock
            .read_elements(table, set.name())?
            .into_iter()
            .filter_map(|e| <[u8; 8]>::try_from(e.key.as_slice()).ok())
            .map(u64::from_ne_bytes)
            .collect();
        let gone: Vec<Vec<u8>> = have
            .difference(want)
            .map(|id| id.to_ne_bytes().to_vec())
            .collect();
        let new: Vec<Vec<u8>> = want
            .difference(&have)
            .map(|id| id.to_ne_bytes().to_vec())
            .collect();
        if !gone.is_empty() {
            batch.del_elements(set.name(), &gone);
        }
        if !new.is_empty() {
            batch.add_keys(set.name(), &new);
        }
        added += new.len();
        deleted += gone.len();
    }
    if batch.len() > 0 {
        sock.commit(batch)?;
    }
    Ok((added, deleted))
}

/// The ids of `outside` as element keys, per set, for a batch that creates the sets.
pub(super) fn keys_of(
    sets: &[CgroupSetDef],
    outside: &Outside,
) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    sets.iter()
        .filter_map(|set| {
            let ids = outside.ids_at(set.level)?;
            let keys: Vec<Vec<u8>> = ids.iter().map(|id| id.to_ne_bytes().to_vec()).collect();
            (!keys.is_empty()).then_some((set.name(), keys))
        })
        .collect()
}

/// What the watch lists: the contained paths and the cgroup2 root (`None`: no cgroups are
/// contained). A reload swaps it ([`plan_of`]) in the admission thread's replacement.
///
/// The lock is also what keeps the watch and a replacement from interleaving: the watch holds
/// it from listing the cgroups to committing the sets, the replacement from listing them for
/// the new plan to swapping the plan in after its commit. Without it a poll that listed the
/// old plan could commit after the replacement, writing the old plan's outside cgroups (a
/// cgroup the reload just contained among them) into the new sets until the next poll.
pub(crate) type SharedPlan = Arc<Mutex<Option<(CgroupPlan, PathBuf)>>>;

/// The shared plan, locked (a poisoned lock still holds the last plan written: a plan is
/// replaced whole, never half-written).
pub(crate) fn lock_plan(plan: &SharedPlan) -> MutexGuard<'_, Option<(CgroupPlan, PathBuf)>> {
    match plan.lock() {
        Ok(p) => p,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The plan for `policy`'s `contain.cgroups` (`None` without any), or why there can be none
/// (no cgroup2 mount).
pub(super) fn plan_of(policy: &Policy) -> Result<Option<(CgroupPlan, PathBuf)>, String> {
    match policy
        .firewall
        .contain
        .as_ref()
        .map(|c| CgroupPlan::of(&c.cgroups))
    {
        Some(plan) if !plan.is_empty() => Ok(Some((plan, cgroup_root()?))),
        _ => Ok(None),
    }
}

/// Adds to a batch that creates `layout`'s cgroup sets the cgroups outside the contained ones
/// now, so that no process outside them meets the gate's default for a moment (install, and a
/// reload's replacement of the table). Returns what was listed.
pub(crate) fn add_outside_cgroups(
    batch: &mut Batch,
    layout: &Layout,
    plan: Option<&(CgroupPlan, PathBuf)>,
) -> Outside {
    let outside = plan
        .map(|(plan, root)| plan.outside(root))
        .unwrap_or_default();
    for (set, keys) in keys_of(&layout.cgroup_sets, &outside) {
        batch.add_keys(set, &keys);
    }
    outside
}

/// Says which contained cgroups do not exist (at start-up, and whenever that changes).
pub(super) fn report_missing(before: &[String], now: &Outside, root: &std::path::Path) {
    for path in now.missing.iter().filter(|p| !before.contains(p)) {
        tracing::warn!(
            target: "dnsfence::firewall",
            cgroup = %path,
            "{}",
            missing_cgroup_message(path, root)
        );
    }
    for path in before.iter().filter(|p| !now.missing.contains(p)) {
        tracing::info!(
            target: "dnsfence::firewall",
            cgroup = %path,
            "firewall.contain.cgroups {path:?} exists now (contained)"
        );
    }
}

/// The running watch; stops when dropped.
pub(super) struct CgroupWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CgroupWatch {
    /// Starts the thread (with its own netlink socket, opened by the caller in the firewall's
    /// network namespace). `seen` is what install listed, so that the first changes are
    /// logged against it.
    pub(super) fn start(
        mut sock: NfSocket,
        table: String,
        plan: SharedPlan,
        seen: Outside,
    ) -> std::io::Result<CgroupWatch> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("dnsfence-cgroups".to_string())
            .spawn(move || {
                let mut missing = seen.missing.clone();
                let mut truncated = seen.truncated;
                let mut last_error: Option<String> = None;
                let mut next = Instant::now() + CGROUP_POLL;
                // What the kernel was last brought to, for which plan, in which table (its
                // handle), and when it was last read back in full: a poll that finds the same
                // cgroups, plan and table costs a directory listing and one small request.
                let mut synced: Option<Vec<BTreeSet<u64>>> = Some(seen.by_level);
                let mut planned = lock_plan(&plan).clone();
                let mut handle = sock.table_handle(&table).ok().flatten();
                let mut full_at = Instant::now();
                while !stopping.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(STOP_CHECK));
                        continue;
                    }
                    next = now + CGROUP_POLL;
                    // Held until this poll's sets are committed (see `SharedPlan`).
                    let now_plan = lock_plan(&plan);
                    if *now_plan != planned {
                        // A reload changed the contained cgroups: read everything back.
                        planned = now_plan.clone();
                        synced = None;
                        missing.clear();
                    }
                    let Some((plan_now, root)) = planned.as_ref() else {
                        continue;
                    };
                    let sets = plan_now.sets();
                    let outside = plan_now.outside(root);
                    report_missing(&missing, &outside, root);
                    missing.clone_from(&outside.missing);
                    if outside.truncated && !truncated {
                        tracing::warn!(
                            target: "dnsfence::firewall",
                            "firewall.contain.cgroups: more than {} cgroups beside a contained \
                             path; the others stay contained",
                            CgroupSetDef::SIZE
                        );
                    }
                    truncated = outside.truncated;
                    let now_handle = sock.table_handle(&table).ok().flatten();
                    let unchanged = synced.as_ref() == Some(&outside.by_level)
                        && now_handle.is_some()
                        && now_handle == handle
                        && full_at.elapsed() < FULL_SYNC;
                    if unchanged {
                        continue;
                    }
                    handle = now_handle;
                    full_at = Instant::now();
                    synced = None;
                    match sync(&mut sock, &table, &sets, &outside) {
                        Ok((0, 0)) => {
                            last_error = None;
                            synced = Some(outside.by_level);
                        }
                        Ok((added, deleted)) => {
                            last_error = None;
                            synced = Some(outside.by_level);
                            tracing::debug!(
                                target: "dnsfence::firewall",
                                added,
                                deleted,
                                "cgroups outside the contained ones changed"
                            );
                        }
                        Err(e) => {
                            let text = e.to_string();
                            if last_error.as_deref() != Some(text.as_str()) {
                                tracing::warn!(
                                    target: "dnsfence::firewall",
                                    error = %text,
                                    "could not update the cgroups outside the contained ones \
                                     (new cgroups beside them stay contained until it works)"
                                );
                            }
                            last_error = Some(text);
                        }
                    }
                }
            })?;
        Ok(CgroupWatch {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (at most one poll's work).
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CgroupWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
