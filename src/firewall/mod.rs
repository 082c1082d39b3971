//! The nftables side of dnsfence: a default-drop firewall that admits exactly the addresses
//! dnsfence handed out.
//!
//! [`Firewall::install`] creates `table inet <firewall.table>` in one atomic transaction: two
//! timeout sets (`allow4`, `allow6`; per client they are keyed `client . destination`) and
//! default-drop base chains for the configured hooks (see `ruleset` for the rules and why they
//! are in that order). An existing table with the same layout is kept as it is, elements and
//! all, so a restart does not cut live allowances; a table that differs in any way is deleted
//! and re-created in the same transaction, so there is no moment without a firewall.
//!
//! [`Admitter::replace`] installs another ruleset while dnsfence runs (a reload that changed
//! hooks, `per_client`, `allow_cidrs`, `contain`; a cgroup re-created under a new id): the old
//! table is deleted and the new one created in one transaction that also re-adds the elements
//! still justified, with their remaining timeouts; refused, the old table stays in use.
//!
//! [`Admitter::admit`] is the hot path: before a DNS reply leaves, every address in it is added
//! to the right set with a timeout derived from its TTL, and the call resolves only once the
//! kernel acknowledged the transaction. The agent can therefore connect to an address as soon as
//! it reads it, and to nothing else. Failures are reported, never swallowed: the server answers
//! SERVFAIL (fail closed).
//!
//! Module map:
//! * `ruleset`: the ruleset as a small IR (`model`), built from the policy one chain at a time
//!   (`build`), rendered to nft text (`text`) and lowered to netlink expressions (`lower`);
//!   the byte keys of set elements (`keys`);
//! * `netlink`: the only code that sees netlink: the socket, batch encoding, attribute walking
//!   and dumps;
//! * `cgroup_watch`: with `contain.cgroups`, keeps the sets of cgroups known to be outside the
//!   contained ones current (the `output` gate accepts only those; see `ruleset::contain`);
//! * `compare`: whether the table in the kernel is the one the policy asks for;
//! * `bridge`: `table bridge <firewall.table>` (`firewall.bind`: bridge ports bound to their
//!   agents' sources, rules in `ruleset::bind`), changed in the main table's transactions;
//! * `admission`: the admission thread, group commit and the lifetime map.
//!
//! What a crash leaves behind: the table, default drop. Agents lose egress until dnsfence is
//! back (fail closed). `on_exit: remove` deletes the table on an orderly [`Firewall::shutdown`]
//! only.
//!
//! Operational notes:
//! * with `forward`, the `input` chain drops everything to the gateway itself except loopback,
//!   established traffic, DNS to dnsfence and neighbour discovery (an SSH session to the
//!   gateway must already be established, or come over loopback). A drop in any table is final
//!   in nftables, so another table cannot re-allow it;
//! * per-client sets match the packet's source address: meaningful in `forward` mode, where the
//!   agents' addresses are the sources; on the `output` hook a local agent queries from
//!   127.0.0.1 but its packets leave from the host's address;
//! * an upstream on a non-loopback address of this host makes every local connection to that
//!   address drop (rule 2 in `ruleset`); use a loopback address for a local resolver.

mod admission;
mod bridge;
mod cgroup_watch;
mod compare;
mod conntrack;
mod netlink;
mod probe;
mod ruleset;
pub mod shared_link;
mod status;

pub use admission::{Carry, Replaced};
pub use bridge::bridge_status;
pub use cgroup_watch::CGROUP_POLL;
pub use netlink::{DropReader, DroppedPacket};
pub use probe::{
    CHECK_FIRST, CHECK_LONGER, KernelProbe, RefreshCheck, TimeoutRefresh, probe_kernel,
};
pub use status::{
    ChainStatus, SetStatus, TableStatus, remove_table, running_servers, table_status,
};

use crate::stage_times::{Span, Stage};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::sync::{mpsc, oneshot};

use crate::policy::{OnExit, Policy};
use admission::{Key, Msg, Request};
use netlink::{NfSocket, NlError, Op};
use ruleset::{BridgeLayout, Family, Layout, normalize_ip, parse_element_key};

/// Requests waiting for the admission thread, at most.
const QUEUE_DEPTH: usize = 4096;
/// Addresses in one admission, at most (a 64 KiB DNS message holds fewer).
pub const MAX_ADDRESSES_PER_ADMISSION: usize = 4096;

/// Why the firewall could not be installed or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirewallError {
    /// The firewall part of the policy cannot be installed as it is.
    #[error("firewall policy: {0}")]
    Policy(String),
    /// Missing privilege.
    #[error("netlink: permission denied: dnsfence needs CAP_NET_ADMIN ({0})")]
    PermissionDenied(String),
    /// The kernel refused a change, or netlink failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// The admission thread could not be started.
    #[error("could not start the firewall admission thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The admission thread has stopped (dnsfence is shutting down).
    #[error("the firewall admission thread has stopped")]
    Stopped,
}

/// Why addresses could not be admitted. The server answers SERVFAIL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmitError {
    /// The set reached `firewall.set_size` live elements.
    #[error("set {set} is full (set_size {size}): raise firewall.set_size")]
    SetFull { set: &'static str, size: u32 },
    /// Per-client sets pair addresses of one family: this client cannot be given that address.
    #[error(
        "per-client firewall: client {client} and address {addr} are of different IP families \
         and cannot be admitted as a pair"
    )]
    FamilyMismatch { client: IpAddr, addr: IpAddr },
    /// With per-client sets: this client already has its share of the set.
    #[error(
        "client {client} has its share of the set ({share} live elements, \
         firewall.max_elements_per_client): nothing more is admitted for it until some expire"
    )]
    ClientShare { client: IpAddr, share: u32 },
    /// More addresses than one admission takes.
    #[error("too many addresses in one admission ({count}, at most {max})")]
    TooManyAddresses { count: usize, max: usize },
    /// Missing privilege.
    #[error("netlink: permission denied: dnsfence needs CAP_NET_ADMIN")]
    PermissionDenied,
    /// The kernel refused the elements.
    #[error("netlink: {0}")]
    Kernel(String),
    /// The netlink socket failed; whether the elements were added is unknown.
    #[error("netlink: {0}")]
    Transport(String),
    /// The firewall was shut down.
    #[error("the firewall admission thread has stopped")]
    Closed,
}

/// What a revocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Elements deleted (or already gone) from the allow sets.
    pub elements: usize,
    /// Connections whose conntrack entries were deleted.
    pub connections: usize,
    /// Why connections could not be cut, if they could not (the elements are gone anyway).
    pub cut_error: Option<String>,
}

/// The installed firewall. Keep it alive while dnsfence serves; end with [`Firewall::shutdown`].
pub struct Firewall {
    table: String,
    refresh: TimeoutRefresh,
    shape: Arc<std::sync::Mutex<Shape>>,
    on_exit: OnExit,
    per_client: Arc<AtomicBool>,
    control: NfSocket,
    tx: mpsc::Sender<Msg>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    confirmed: Arc<admission::Confirmed>,
    /// With `contain.cgroups`: keeps the sets of cgroups outside the contained ones current.
    cgroup_watch: Option<cgroup_watch::CgroupWatch>,
    /// What the watch lists; a reload's replacement swaps it ([`Admitter::replace`]).
    cgroup_plan: cgroup_watch::SharedPlan,
}

/// What `check` and `serve` both say about this host's side of `firewall.contain` (one
/// function, so they cannot disagree): an error when cgroups are contained but no cgroup2
/// hierarchy is mounted; a warning for each contained cgroup that does not exist yet (serve
/// waits for it: it is contained from the moment it appears), and for each interface entry
/// that names a bridge port (the bridge, not the port, is what the hooks see).
pub fn contain_host_warnings(policy: &Policy) -> Result<Vec<String>, String> {
    match policy.firewall.contain.as_ref() {
        Some(c) if policy.firewall.enabled => {
            let mut warnings = ruleset::cgroup_host_warnings(&c.cgroups)?;
            warnings.extend(ruleset::interface_host_warnings(
                &c.interfaces,
                std::path::Path::new("/sys/class/net"),
            ));
            Ok(warnings)
        }
        _ => Ok(Vec::new()),
    }
}

/// What the start and stop lines say about the installed ruleset; a replacement updates it.
#[derive(Debug, Clone)]
struct Shape {
    drop_hooks: Vec<&'static str>,
    contained: String,
}

fn contained_text(policy: &Policy) -> String {
    match &policy.firewall.contain {
        Some(c) => format!(
            "the contained agents only ({}; firewall.contain)",
            c.summary()
        ),
        None => "everything on these hooks (no firewall.contain)".to_string(),
    }
}

/// A cheap, clonable handle to admit addresses from any task.
#[derive(Clone)]
pub struct Admitter {
    tx: mpsc::Sender<Msg>,
    /// Whether the sets are per client now (a replacement may switch it).
    per_client: Arc<AtomicBool>,
    confirmed: Arc<admission::Confirmed>,
    shape: Arc<std::sync::Mutex<Shape>>,
    /// What the cgroup watch lists, for [`Admitter::replace`] to swap with the table.
    cgroup_plan: cgroup_watch::SharedPlan,
}

/// Checks a table name given on the command line by the policy's one rule for
/// `firewall.table`.
pub fn check_table_name(name: &str) -> Result<(), String> {
    crate::policy::check_table_name(name)
}

/// How long an element admitted for `lifetime` lives in the kernel (the admission clamp).
pub fn admitted_lifetime(lifetime: Duration) -> Duration {
    admission::clamp(lifetime)
}

/// The equivalent nft script of what [`Firewall::install`] creates, in the format of
/// `nft list table inet <table>`, for `dnsfence ruleset`. An invalid firewall policy renders
/// as comments only, saying why.
pub fn render_nft(policy: &Policy) -> String {
    match Layout::from_policy(policy) {
        Ok(layout) => {
            let mut text = layout.render();
            if let Some(bridge) = BridgeLayout::from_policy(policy) {
                text.push('\n');
                text.push_str(&bridge.render());
            }
            text
        }
        Err(why) => format!("# dnsfence: no ruleset: {why}\n"),
    }
}

/// Describes an operation with the text of the rule it concerns, if any.
fn describe(op: &Op, layout: Option<&Layout>) -> String {
    if let (Op::NewRule { chain, index }, Some(l)) = (op, layout)
        && let Some(rule) = l
            .chains
            .iter()
            .find(|c| c.name() == *chain)
            .and_then(|c| c.rules.get(*index))
    {
        return format!("{op} ({})", rule.text());
    }
    op.to_string()
}

fn firewall_error(e: NlError, table: &str, layout: Option<&Layout>) -> FirewallError {
    let what = e
        .op()
        .map(|op| describe(op, layout))
        .unwrap_or_else(|| "netlink".to_string());
    if e.is_permission() {
        return FirewallError::PermissionDenied(what);
    }
    let hint = match (e.errno(), e.op()) {
        (Some(Errno::ENOENT | Errno::EOPNOTSUPP), Some(Op::NewRule { .. })) => {
            " (the kernel lacks an nf_tables expression this rule needs: modules nft_ct, \
             nft_fib_inet, nft_limit, nft_log)"
        }
        (Some(Errno::ENOENT | Errno::EOPNOTSUPP | Errno::EAFNOSUPPORT), Some(Op::Bridge(_))) => {
            " (firewall.bind needs nf_tables' bridge family: a kernel built with \
             CONFIG_NF_TABLES_BRIDGE, module nf_tables_bridge or nft_meta_bridge)"
        }
        (Some(Errno::EEXIST), Some(Op::NewTable)) => {
            " (another process created the table at the same time)"
        }
        _ => "",
    };
    let detail = match &e {
        NlError::Kernel { errno, detail, .. } => {
            let mut s = format!("{what}: {} ({errno:?})", errno.desc());
            if let Some(d) = detail {
                s.push_str(": ");
                s.push_str(d);
            }
            s
        }
        other => other.to_string(),
    };
    FirewallError::Netlink(format!("table inet {table}: {detail}{hint}"))
}

impl Firewall {
    /// Creates the table, sets and chains in one atomic batch, or keeps the existing table
    /// untouched (elements and all) when its layout is the same; a changed layout is replaced
    /// atomically (delete + create in one batch). Blocking; called once at start-up, on a thread
    /// in the network namespace to firewall (the netlink sockets are opened here).
    pub fn install(policy: &Policy) -> Result<Firewall, FirewallError> {
        Firewall::install_with(policy, TimeoutRefresh::Detect)
    }

    /// [`Firewall::install`], choosing how lifetimes are extended instead of asking the kernel
    /// (tests force the path older kernels take).
    pub fn install_with(
        policy: &Policy,
        refresh: TimeoutRefresh,
    ) -> Result<Firewall, FirewallError> {
        let fw = &policy.firewall;
        if !fw.enabled {
            return Err(FirewallError::Policy(
                "firewall.enabled is false: there is nothing to install".to_string(),
            ));
        }
        let layout = Layout::from_policy(policy).map_err(FirewallError::Policy)?;
        let table = layout.table.clone();
        let err = |e: NlError| firewall_error(e, &table, Some(&layout));

        // The cgroups outside the contained ones go into the sets in the same transaction
        // that creates them: the host's other processes never meet the gate's default.
        let plan = cgroup_watch::plan_of(policy).map_err(FirewallError::Policy)?;
        let mut outside = ruleset::Outside::default();

        let mut control = NfSocket::open().map_err(err)?;
        // firewall.bind: the bridge table goes in (or out) with the main one.
        let bridge_want = BridgeLayout::from_policy(policy);
        let bridge_plan = bridge::BridgePlan::read(&mut control, &table).map_err(err)?;
        let mut seed = Vec::new();
        match control.read_table(&table).map_err(err)? {
            None => {
                let mut b = control.begin(&table);
                b.add_layout(&layout);
                outside = cgroup_watch::add_outside_cgroups(&mut b, &layout, plan.as_ref());
                bridge_plan.add_to(&mut b, bridge_want.as_ref());
                control.commit(b).map_err(err)?;
                tracing::info!(target: "dnsfence::firewall", table = %table, "created the nftables table");
            }
            Some(existing) => match compare::compare(&layout, &existing) {
                Ok(()) => {
                    seed = keep_elements(&mut control, &layout).map_err(err)?;
                    let mut b = control.begin(&table);
                    if bridge_plan.add_to(&mut b, bridge_want.as_ref()) {
                        control.commit(b).map_err(err)?;
                    }
                    tracing::info!(
                        target: "dnsfence::firewall",
                        table = %table,
                        elements = seed.len(),
                        "kept the existing nftables table (same layout)"
                    );
                }
                Err(why) => {
                    let mut b = control.begin(&table);
                    b.del_table();
                    b.add_layout(&layout);
                    outside = cgroup_watch::add_outside_cgroups(&mut b, &layout, plan.as_ref());
                    bridge_plan.add_to(&mut b, bridge_want.as_ref());
                    control.commit(b).map_err(err)?;
                    tracing::warn!(
                        target: "dnsfence::firewall",
                        table = %table,
                        reason = %why,
                        "replaced the nftables table (its layout differed; its elements are gone)"
                    );
                }
            },
        }

        // The bindings are what make client identities on a bridge trustworthy: a bridge table
        // that does not read back as built is not served on.
        bridge::read_back(&mut control, &table, bridge_want.as_ref()).map_err(|why| {
            FirewallError::Netlink(format!("table bridge {table} (firewall.bind): {why}"))
        })?;
        if let Some(b) = &bridge_want {
            tracing::info!(
                target: "dnsfence::firewall",
                table = %table,
                ports = %b.ports().join(","),
                "bridge ports bound to their sources (table bridge)"
            );
        }

        // A kept table: bring its cgroup sets up to date before anything is answered.
        if let (Some((p, root)), true) = (plan.as_ref(), outside == ruleset::Outside::default()) {
            outside = p.outside(root);
        }
        cgroup_watch::sync(&mut control, &table, &layout.cgroup_sets, &outside).map_err(err)?;
        // The watch runs whatever the policy says now: a reload may add cgroups.
        let cgroup_plan: cgroup_watch::SharedPlan = Arc::new(std::sync::Mutex::new(plan));
        let cgroup_watch = Some(
            cgroup_watch::CgroupWatch::start(
                NfSocket::open().map_err(err)?,
                table.clone(),
                Arc::clone(&cgroup_plan),
                outside,
            )
            .map_err(FirewallError::Thread)?,
        );

        let refresh = match refresh {
            TimeoutRefresh::Detect => match probe::readd_refreshes_timeout(&mut control) {
                Ok(true) => TimeoutRefresh::ReAdd,
                Ok(false) => {
                    tracing::info!(
                        target: "dnsfence::firewall",
                        "this kernel keeps an element's old timeout when it is added again \
                         (before Linux 6.12): lifetimes are extended by delete and re-add"
                    );
                    TimeoutRefresh::DeleteReAdd
                }
                Err(e) => {
                    tracing::warn!(
                        target: "dnsfence::firewall",
                        error = %e,
                        "could not probe how this kernel refreshes timeouts: extending \
                         lifetimes by delete and re-add, which works on every kernel"
                    );
                    TimeoutRefresh::DeleteReAdd
                }
            },
            chosen => chosen,
        };
        let admit_sock = NfSocket::open().map_err(err)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = admission::Config {
            table: table.clone(),
            per_client: fw.per_client,
            set_size: fw.set_size,
            delete_readd: refresh == TimeoutRefresh::DeleteReAdd,
            client_share: fw.elements_per_client().clamp(1, fw.set_size.max(1)),
        };
        let confirmed = Arc::new(admission::Confirmed::new(fw.set_size as usize));
        let per_client = Arc::new(AtomicBool::new(fw.per_client));
        let thread = admission::spawn(
            admit_sock,
            cfg,
            seed,
            rx,
            Arc::clone(&stop),
            Arc::clone(&confirmed),
            Arc::clone(&per_client),
        )
        .map_err(FirewallError::Thread)?;
        let contained = match &fw.contain {
            Some(c) if !layout.subordinate_ids.is_empty() => format!(
                "the contained agents only ({}; {}; firewall.contain)",
                c.summary(),
                layout.subordinate_ids
            ),
            _ => contained_text(policy),
        };
        let shape = Arc::new(std::sync::Mutex::new(Shape {
            drop_hooks: admission::drop_hooks(&layout),
            contained,
        }));
        Ok(Firewall {
            table,
            refresh,
            shape,
            on_exit: fw.on_exit,
            per_client,
            control,
            tx,
            stop,
            thread: Some(thread),
            confirmed,
            cgroup_watch,
            cgroup_plan,
        })
    }

    /// How this firewall extends lifetimes: [`TimeoutRefresh::ReAdd`] or
    /// [`TimeoutRefresh::DeleteReAdd`] (what the kernel was found to need, or what was chosen).
    pub fn timeout_refresh(&self) -> TimeoutRefresh {
        self.refresh
    }

    /// The name of the table (`table inet <name>`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The hooks whose chains drop what no rule accepts, in the order they were installed
    /// (by the last replacement, if any).
    pub fn drop_hooks(&self) -> Vec<&'static str> {
        self.shape
            .lock()
            .map(|s| s.drop_hooks.clone())
            .unwrap_or_default()
    }

    /// Who meets the default-drop rules, for the start-up line: the agents `firewall.contain`
    /// names, or everything.
    pub fn contained(&self) -> String {
        self.shape
            .lock()
            .map(|s| s.contained.clone())
            .unwrap_or_default()
    }

    /// Whether [`Firewall::shutdown`] leaves the table in place (`on_exit: keep`).
    pub fn keeps_table(&self) -> bool {
        self.on_exit == OnExit::Keep
    }

    /// A cheap clonable handle for the hot path.
    pub fn admitter(&self) -> Admitter {
        Admitter {
            tx: self.tx.clone(),
            per_client: Arc::clone(&self.per_client),
            confirmed: Arc::clone(&self.confirmed),
            shape: Arc::clone(&self.shape),
            cgroup_plan: Arc::clone(&self.cgroup_plan),
        }
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Release);
        // If the queue is full the thread is busy and sees the flag after this batch.
        let _ = self.tx.try_send(Msg::Wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(w) = self.cgroup_watch.as_mut() {
            w.stop();
        }
    }

    /// Stops admitting (pending and later admissions fail with [`AdmitError::Closed`]), then
    /// applies `on_exit`: `remove` deletes the table, `keep` leaves it (and its elements, which
    /// expire on their own). Blocking.
    pub fn shutdown(mut self) -> Result<(), FirewallError> {
        self.stop_thread();
        match self.on_exit {
            OnExit::Keep => Ok(()),
            OnExit::Remove => match bridge::remove_both(&mut self.control, &self.table) {
                Ok(_) => {
                    tracing::info!(target: "dnsfence::firewall", table = %self.table, "removed the nftables table (and its bridge table, if any)");
                    Ok(())
                }
                Err(NlError::Kernel {
                    errno: Errno::ENOENT,
                    ..
                }) => Ok(()),
                Err(e) => Err(firewall_error(e, &self.table, None)),
            },
        }
    }
}

impl Drop for Firewall {
    /// Dropping without `shutdown` stops admitting and leaves the table (fail closed).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.tx.try_send(Msg::Wake);
    }
}

/// Reads the elements of a kept table: their expiries seed the lifetime map, and elements
/// without a timeout (permanent, which dnsfence never adds) are deleted.
fn keep_elements(sock: &mut NfSocket, layout: &Layout) -> Result<Vec<(Key, Instant)>, NlError> {
    let now = Instant::now();
    let mut seed = Vec::new();
    let mut batch = sock.begin(&layout.table);
    for set in &layout.sets {
        let mut permanent = Vec::new();
        for e in sock.read_elements(&layout.table, set.name())? {
            match (e.timeout_ms, e.expiration_ms) {
                (Some(t), Some(left)) if t > 0 => {
                    if let Some(key) = parse_element_key(set, &e.key) {
                        let left = Duration::from_millis(left).min(admission::MAX_LIFETIME);
                        if let Some(expiry) = now.checked_add(left) {
                            seed.push((key, expiry));
                        }
                    }
                }
                _ => permanent.push(e.key),
            }
        }
        if !permanent.is_empty() {
            tracing::warn!(
                target: "dnsfence::firewall",
                set = set.name(),
                count = permanent.len(),
                "deleting elements without timeout (they would never expire)"
            );
            batch.del_elements(set.name(), &permanent);
        }
    }
    if batch.len() > 0 {
        sock.commit(batch)?;
    }
    Ok(seed)
}

impl Admitter {
    /// Whether the admission thread answers (after the admissions queued before this ask).
    pub async fn answers(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Msg::Ping(reply)).await.is_ok() && answer.await.is_ok()
    }

    /// The live elements of the allow sets (IPv4, IPv6) as the admission thread granted them,
    /// or `None` when the thread does not answer. Answering also shows the thread is alive.
    pub async fn live_elements(&self) -> Option<[usize; 2]> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Msg::Ping(reply)).await.ok()?;
        answer.await.ok()
    }

    /// Whether the sets pair clients with destinations (`firewall.per_client`), now.
    pub fn per_client(&self) -> bool {
        self.per_client.load(Ordering::Acquire)
    }

    /// Replaces the ruleset with the one `policy` asks for, in one transaction that also adds
    /// the elements `carry` keeps (with what is left of their lifetimes), ordered after every
    /// admission queued before it. When the kernel's table already has that layout nothing
    /// changes (`changed: false`) but the cgroup sets, when `contain.cgroups` changed. The
    /// cgroup watch follows the new `contain.cgroups` from the commit on (it waits for the
    /// replacement, so it never writes the old paths' listing into the new sets). On any error
    /// the old table stays installed and in use, and the watch keeps the old paths.
    /// See `admission/replace.rs`.
    /// `cut_ranges`: `allow_cidrs` ranges that are gone, whose connections are cut once the new
    /// table is in (pass none to keep them).
    pub async fn replace(
        &self,
        policy: Arc<Policy>,
        carry: Carry,
        cut_ranges: Vec<ipnet::IpNet>,
    ) -> Result<Replaced, FirewallError> {
        let (reply, answer) = oneshot::channel();
        let contained = contained_text(&policy);
        let request = admission::ReplaceRequest {
            policy,
            carry,
            cut_ranges,
            cgroups: Arc::clone(&self.cgroup_plan),
            reply,
        };
        self.tx
            .send(Msg::Replace(request))
            .await
            .map_err(|_| FirewallError::Stopped)?;
        let replaced = answer.await.map_err(|_| FirewallError::Stopped)??;
        if replaced.changed
            && let Ok(mut shape) = self.shape.lock()
        {
            shape.drop_hooks = replaced.drop_hooks.clone();
            shape.contained = contained;
        }
        Ok(replaced)
    }

    /// Deletes the elements for `targets` from the allow sets in one transaction, ordered after
    /// every admission queued before it; with `cut`, then deletes the conntrack entries of the
    /// connections to them, so established streams end at once. With per-client sets a target
    /// names its client (a target without one is skipped); otherwise the client is ignored.
    pub async fn revoke(
        &self,
        targets: Vec<(Option<IpAddr>, IpAddr)>,
        cut: bool,
    ) -> Result<Revoked, AdmitError> {
        if targets.is_empty() {
            return Ok(Revoked::default());
        }
        let (reply, answer) = oneshot::channel();
        let request = admission::RevokeRequest {
            targets,
            cut,
            reply,
        };
        self.tx
            .send(Msg::Revoke(request))
            .await
            .map_err(|_| AdmitError::Closed)?;
        answer.await.map_err(|_| AdmitError::Closed)?
    }

    /// Whether [`Admitter::admit`] would return at once for these addresses: every one is in
    /// the kernel for at least its lifetime, as acknowledged moments ago. Never waits, sends
    /// nothing; `false` means "ask `admit`", never "refused".
    pub fn covered(&self, client: IpAddr, addrs: &[(IpAddr, Duration)]) -> bool {
        let client = normalize_ip(client);
        let per_client = self.per_client();
        if addrs.len() > MAX_ADDRESSES_PER_ADMISSION
            || (per_client
                && addrs
                    .iter()
                    .any(|&(a, _)| Family::of(a) != Family::of(client)))
        {
            return false;
        }
        let items: Vec<(IpAddr, Duration)> = addrs
            .iter()
            .map(|&(addr, lifetime)| (addr, admission::clamp(lifetime)))
            .collect();
        self.confirmed
            .covers(per_client.then_some(client), &items, Instant::now())
    }

    /// Admits every address for `lifetime` each (clamped to 1 s ..= 7 days); resolves only once
    /// the kernel ACKed the whole batch. With per-client sets, `client` (IPv4-mapped addresses
    /// count as IPv4) must be of the same family as every address.
    pub async fn admit(
        &self,
        client: IpAddr,
        addrs: &[(IpAddr, Duration)],
    ) -> Result<(), AdmitError> {
        if addrs.is_empty() {
            return Ok(());
        }
        if addrs.len() > MAX_ADDRESSES_PER_ADMISSION {
            return Err(AdmitError::TooManyAddresses {
                count: addrs.len(),
                max: MAX_ADDRESSES_PER_ADMISSION,
            });
        }
        let client = normalize_ip(client);
        let per_client = self.per_client();
        let mut items = Vec::with_capacity(addrs.len());
        for &(addr, lifetime) in addrs {
            if per_client && Family::of(addr) != Family::of(client) {
                return Err(AdmitError::FamilyMismatch { client, addr });
            }
            items.push((addr, admission::clamp(lifetime)));
        }
        // Every address acknowledged moments ago for at least this long: no round trip.
        if self
            .confirmed
            .covers(per_client.then_some(client), &items, Instant::now())
        {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let queued = Span::start();
        // Always the client: the thread pairs it only if the sets are per client when it
        // commits (a reload may switch that meanwhile).
        let req = Request {
            client: Some(client),
            items,
            reply,
            queued,
        };
        self.tx
            .send(Msg::Admit(req))
            .await
            .map_err(|_| AdmitError::Closed)?;
        let acknowledged = answer.await.map_err(|_| AdmitError::Closed)?;
        queued.end(Stage::AdmitWait);
        acknowledged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync>() {}

    /// The server spawns admissions on a multi-threaded runtime and shares the handles.
    #[test]
    fn handles_and_futures_are_send() {
        assert_send_sync::<Admitter>();
        assert_send_sync::<Firewall>();
        let (tx, _rx) = mpsc::channel(1);
        let a = Admitter {
            tx,
            per_client: Arc::new(AtomicBool::new(false)),
            confirmed: Arc::new(admission::Confirmed::new(1)),
            shape: Arc::new(std::sync::Mutex::new(Shape {
                drop_hooks: vec![],
                contained: String::new(),
            })),
            cgroup_plan: Default::default(),
        };
        let addrs = [(IpAddr::from([192, 0, 2, 1]), Duration::from_secs(1))];
        let fut = a.admit(IpAddr::from([127, 0, 0, 1]), &addrs);
        assert_send(&fut);
    }

    #[test]
    fn invalid_policy_renders_a_reason() {
        let mut p = testns::policy("x");
        p.firewall.table = "bad name; flush ruleset".into();
        let text = render_nft(&p);
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
        assert!(matches!(
            Firewall::install(&p),
            Err(FirewallError::Policy(_))
        ));
    }
}

// The integration tests' tool check (std only), so that a missing `ip` fails naming its package.
#[cfg(test)]
#[path = "../../tests/common/tools.rs"]
mod test_tools;

/// Network namespaces for the tests that need the kernel (root). Without root they skip with a
/// message, unless `CI` is set: then they fail.
#[cfg(test)]
pub(crate) mod testns {
    use std::fs::File;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::Duration;

    use nix::sched::CloneFlags;

    use super::test_tools as tools;
    use crate::policy::{
        DenyWith, FirewallPolicy, Group, Hook, LogTarget, OnExit, Policy, RuleSet, TtlPolicy,
    };

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
            })
            .unwrap_or(false)
    }

    /// A network namespace, deleted when dropped (also when the test panics).
    pub(crate) struct Netns {
        name: String,
    }

    impl Netns {
        pub(crate) fn new(tag: &str) -> Option<Netns> {
            if !is_root() {
                if std::env::var_os("CI").is_some() {
                    panic!("{tag}: needs root and CI is set: failing instead of skipping");
                }
                eprintln!("SKIPPED {tag}: needs root");
                return None;
            }
            tools::require_tool("ip");
            let name = format!("dnsf-u{tag}-{}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name} failed");
            let ns = Netns { name };
            let _ = Command::new("ip")
                .args(["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])
                .status();
            Some(ns)
        }

        /// Runs `f` on a thread inside the namespace.
        pub(crate) fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let fd = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
                    nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("namespace thread panicked")
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// A policy with an output-hook firewall and nothing else of interest.
    pub(crate) fn policy(table: &str) -> Policy {
        Policy {
            source: PathBuf::from("test.yaml"),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 53))],
            upstreams: vec![SocketAddr::from(([192, 0, 2, 53], 53))],
            upstream_timeout: Duration::from_secs(2),
            upstream_options: Default::default(),
            deny_answers: vec![],
            nat64_prefixes: vec![],
            cname: crate::policy::CnameMode::Follow,
            https_hints: crate::policy::HintMode::Admit,
            limits: crate::policy::Limits::default(),
            exfiltration: crate::policy::ExfiltrationLimits::default(),
            mode: crate::policy::Mode::Enforce,
            metrics: None,
            warnings: vec![],
            control: Default::default(),
            revoke: Default::default(),
            grants: Default::default(),
            deny_with: DenyWith::NxDomain,
            qtypes: vec![],
            default_group: Group {
                name: "default".into(),
                from: vec![],
                rules: RuleSet::default(),
                allow_answers: vec![],
            },
            clients: vec![],
            log: LogTarget::Stdout,
            ttl: TtlPolicy {
                min: Duration::from_secs(30),
                max: Duration::from_secs(3600),
                grace: Duration::from_secs(30),
            },
            firewall: FirewallPolicy {
                enabled: true,
                table: table.to_string(),
                hooks: vec![Hook::Output],
                allow_cidrs: vec![],
                per_client: false,
                log_denied: false,
                on_exit: OnExit::Keep,
                set_size: 1024,
                mark: 1,
                ..FirewallPolicy::default()
            },
        }
    }
}
