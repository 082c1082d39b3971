//! Whether this kernel refreshes an element's timeout when the element is added again.
//!
//! Since Linux 6.12 re-adding an existing element overwrites its timeout; through 6.11 the
//! kernel answers success and keeps the old expiry (Debian 12, Ubuntu 22.04 and 24.04, RHEL 9
//! are all before it). There, a later and longer answer would never extend an element, and the
//! agent's connections to a just-answered address would be dropped when the first lifetime
//! ends. So at start dnsfence asks the kernel itself, with a scratch element in a scratch table:
//! add it with one timeout, add it again with a longer one, read the timeout back. Where the
//! kernel kept the first, the admission thread extends an element by deleting and re-adding it
//! in the same transaction (nf_tables commits a batch as one generation: no packet sees the
//! element missing).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use tokio::sync::mpsc;

use super::admission::{self, Msg};
use super::netlink::{Elem, NfSocket, NlError};
use super::ruleset::{Family, SetDef};
use super::{Admitter, FirewallError, Shape, firewall_error};

/// How an element's lifetime is extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutRefresh {
    /// Ask the kernel at start (the default).
    Detect,
    /// Adding the element again sets its new timeout (Linux 6.12 and later).
    ReAdd,
    /// Delete and re-add in one transaction (every kernel; what older ones need).
    DeleteReAdd,
}

const FIRST_MS: u64 = 60_000;
const SECOND_MS: u64 = 120_000;
/// An address from TEST-NET-1, in a table no chain uses: it admits nothing.
const SCRATCH_KEY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// Asks the kernel (in the namespace `sock` belongs to) whether a re-added element takes its
/// new timeout. Leaves nothing behind.
pub(crate) fn readd_refreshes_timeout(sock: &mut NfSocket) -> Result<bool, NlError> {
    let table = format!("dnsfence_probe_{}", std::process::id());
    // A leftover from a run that died halfway.
    let mut b = sock.begin(&table);
    b.del_table();
    match sock.commit(b) {
        Ok(()) => {}
        Err(NlError::Kernel {
            errno: Errno::ENOENT,
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    let result = probe(sock, &table);
    let mut b = sock.begin(&table);
    b.del_table();
    let cleanup = sock.commit(b);
    let refreshed = result?;
    cleanup?;
    Ok(refreshed)
}

fn probe(sock: &mut NfSocket, table: &str) -> Result<bool, NlError> {
    let set = SetDef {
        family: Family::V4,
        per_client: false,
        size: 1,
    };
    let key = SCRATCH_KEY.octets();
    let mut b = sock.begin(table);
    b.add_table();
    b.add_set(&set, 1);
    b.add_elements(
        set.name(),
        &[Elem {
            key: &key,
            timeout_ms: FIRST_MS,
        }],
    );
    sock.commit(b)?;
    let mut b = sock.begin(table);
    b.add_elements(
        set.name(),
        &[Elem {
            key: &key,
            timeout_ms: SECOND_MS,
        }],
    );
    sock.commit(b)?;
    let elems = sock.read_elements(table, set.name())?;
    let timeout = elems
        .iter()
        .find(|e| e.key == key)
        .and_then(|e| e.timeout_ms);
    match timeout {
        Some(SECOND_MS) => Ok(true),
        Some(FIRST_MS) => Ok(false),
        other => Err(NlError::Protocol(format!(
            "probing timeout refresh: the scratch element reads back with timeout {other:?} ms"
        ))),
    }
}

impl TimeoutRefresh {
    /// A short name for reports: `detect`, `re-add`, `delete+re-add`.
    pub fn name(self) -> &'static str {
        match self {
            TimeoutRefresh::Detect => "detect",
            TimeoutRefresh::ReAdd => "re-add",
            TimeoutRefresh::DeleteReAdd => "delete+re-add",
        }
    }
}

/// The lifetime the checks admit first, then the longer one the refresh must give.
pub const CHECK_FIRST: Duration = Duration::from_secs(60);
/// See [`CHECK_FIRST`].
pub const CHECK_LONGER: Duration = Duration::from_secs(600);
/// The address the checks admit (TEST-NET-2), in scratch tables no chain uses.
const CHECK_KEY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

/// What `dnsfence firewall probe` finds out about this kernel (see [`probe_kernel`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KernelProbe {
    /// Whether adding an existing element again sets its new timeout (Linux 6.12 and later).
    pub readd_refreshes_timeout: bool,
    /// What [`super::Firewall::install`] chooses on this kernel.
    pub chosen: TimeoutRefresh,
    /// Each way of extending a lifetime, tried through the admission thread.
    pub checks: Vec<RefreshCheck>,
}

/// One way of extending a lifetime, and what the kernel made of it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RefreshCheck {
    /// [`TimeoutRefresh::ReAdd`] or [`TimeoutRefresh::DeleteReAdd`].
    pub path: TimeoutRefresh,
    /// The element's timeout as the kernel reports it after the second admission.
    pub timeout: Option<Duration>,
    /// How long the element has left, as the kernel reports it.
    pub expires_in: Option<Duration>,
}

impl RefreshCheck {
    /// Whether the element now lives [`CHECK_LONGER`] (it was admitted for [`CHECK_FIRST`]).
    pub fn extended(&self) -> bool {
        self.timeout == Some(CHECK_LONGER) && self.expires_in.is_some_and(|e| e > CHECK_FIRST)
    }
}

/// Asks the kernel (in this thread's network namespace) how it treats a re-added element, and
/// runs dnsfence's own admission thread once per refresh path: admit an address for
/// [`CHECK_FIRST`], then for [`CHECK_LONGER`], and read the element back over netlink.
/// Everything happens in scratch tables without chains (nothing is filtered or let through)
/// that are deleted afterwards. Blocking; needs CAP_NET_ADMIN.
pub fn probe_kernel() -> Result<KernelProbe, FirewallError> {
    let mut control = NfSocket::open().map_err(|e| firewall_error(e, "dnsfence_probe", None))?;
    let readd_refreshes_timeout = readd_refreshes_timeout(&mut control)
        .map_err(|e| firewall_error(e, "dnsfence_probe", None))?;
    let chosen = if readd_refreshes_timeout {
        TimeoutRefresh::ReAdd
    } else {
        TimeoutRefresh::DeleteReAdd
    };
    let mut checks = Vec::new();
    for path in [TimeoutRefresh::DeleteReAdd, TimeoutRefresh::ReAdd] {
        checks.push(check_refresh(&mut control, path)?);
    }
    Ok(KernelProbe {
        readd_refreshes_timeout,
        chosen,
        checks,
    })
}

fn check_refresh(
    control: &mut NfSocket,
    path: TimeoutRefresh,
) -> Result<RefreshCheck, FirewallError> {
    let table = format!("dnsfence_check_{}", std::process::id());
    let err = |e: NlError| firewall_error(e, &table, None);
    let set = SetDef {
        family: Family::V4,
        per_client: false,
        size: 16,
    };
    let mut b = control.begin(&table);
    b.del_table();
    match control.commit(b) {
        Ok(())
        | Err(NlError::Kernel {
            errno: Errno::ENOENT,
            ..
        }) => {}
        Err(e) => return Err(err(e)),
    }
    let mut b = control.begin(&table);
    b.add_table();
    b.add_set(&set, 1);
    control.commit(b).map_err(err)?;
    let admitted = admit_twice(&table, path);
    let read = control.read_elements(&table, set.name());
    let mut b = control.begin(&table);
    b.del_table();
    let cleanup = control.commit(b);
    admitted?;
    let elems = read.map_err(err)?;
    cleanup.map_err(err)?;
    let key = CHECK_KEY.octets();
    let elem = elems.iter().find(|e| e.key == key).ok_or_else(|| {
        FirewallError::Netlink(format!(
            "table inet {table}: {CHECK_KEY} is missing from set {} after admitting it",
            set.name()
        ))
    })?;
    Ok(RefreshCheck {
        path,
        timeout: elem.timeout_ms.map(Duration::from_millis),
        expires_in: elem.expiration_ms.map(Duration::from_millis),
    })
}

/// Admits [`CHECK_KEY`] for [`CHECK_FIRST`], then for [`CHECK_LONGER`], through an admission
/// thread of its own, as `serve` does.
fn admit_twice(table: &str, path: TimeoutRefresh) -> Result<(), FirewallError> {
    let sock = NfSocket::open().map_err(|e| firewall_error(e, table, None))?;
    let (tx, rx) = mpsc::channel(8);
    let stop = Arc::new(AtomicBool::new(false));
    let confirmed = Arc::new(admission::Confirmed::new(16));
    let per_client = Arc::new(AtomicBool::new(false));
    let cfg = admission::Config {
        table: table.to_string(),
        per_client: false,
        set_size: 16,
        delete_readd: path == TimeoutRefresh::DeleteReAdd,
        client_share: 16,
    };
    let thread = admission::spawn(
        sock,
        cfg,
        Vec::new(),
        rx,
        Arc::clone(&stop),
        Arc::clone(&confirmed),
        Arc::clone(&per_client),
    )
    .map_err(FirewallError::Thread)?;
    let admitter = Admitter {
        tx: tx.clone(),
        per_client,
        confirmed,
        shape: Arc::new(std::sync::Mutex::new(Shape {
            drop_hooks: Vec::new(),
            contained: String::new(),
        })),
        cgroup_plan: Default::default(),
    };
    // Its own thread, so that a runtime of the caller's (if any) is never blocked on.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(FirewallError::Thread)?;
            let addr = IpAddr::V4(CHECK_KEY);
            rt.block_on(async {
                for lifetime in [CHECK_FIRST, CHECK_LONGER] {
                    admitter
                        .admit(addr, &[(addr, lifetime)])
                        .await
                        .map_err(|e| FirewallError::Netlink(format!("table inet {table}: {e}")))?;
                }
                Ok(())
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(FirewallError::Netlink(
                "the probe's admitting thread panicked".to_string(),
            ))
        })
    });
    stop.store(true, Ordering::Release);
    let _ = tx.try_send(Msg::Wake);
    let _ = thread.join();
    result
}
