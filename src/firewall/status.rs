//! What `dnsfence firewall status` and `dnsfence firewall remove` see and do: a table read over
//! netlink (hooks, sets, element counts), never through `nft list`, which takes minutes on a set
//! of 100,000 timed elements.

use std::path::Path;

use nix::errno::Errno;

use super::netlink::{NfSocket, NlError, hook_name};
use super::{FirewallError, firewall_error};

/// One base chain of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainStatus {
    pub name: String,
    /// `prerouting`, `input`, `forward`, `output`, ...
    pub hook: String,
    /// The chain's policy is drop: what no rule accepts is dropped.
    pub drops: bool,
}

/// One set of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStatus {
    pub name: String,
    /// `size` of the set, if it has one.
    pub size: Option<u32>,
    /// Elements in the set now (read from the kernel).
    pub elements: usize,
}

/// A table as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatus {
    pub table: String,
    pub chains: Vec<ChainStatus>,
    pub sets: Vec<SetStatus>,
}

impl TableStatus {
    /// The hooks whose chains drop by default.
    pub fn drop_hooks(&self) -> Vec<&str> {
        self.chains
            .iter()
            .filter(|c| c.drops)
            .map(|c| c.hook.as_str())
            .collect()
    }
}

/// Reads `table inet <table>` in this thread's network namespace; `None` when there is none.
pub fn table_status(table: &str) -> Result<Option<TableStatus>, FirewallError> {
    let err = |e: NlError| firewall_error(e, table, None);
    let mut sock = NfSocket::open().map_err(err)?;
    let Some(k) = sock.read_table(table).map_err(err)? else {
        return Ok(None);
    };
    let chains = k
        .chains
        .iter()
        .map(|c| ChainStatus {
            name: c.name.clone(),
            hook: c.hook.map_or_else(|| "none".to_string(), hook_name),
            drops: c.policy == Some(0),
        })
        .collect();
    let mut sets = Vec::new();
    for s in &k.sets {
        let elements = sock.read_elements(table, &s.name).map_err(err)?.len();
        sets.push(SetStatus {
            name: s.name.clone(),
            size: s.size,
            elements,
        });
    }
    Ok(Some(TableStatus {
        table: table.to_string(),
        chains,
        sets,
    }))
}

/// Deletes `table inet <table>` and its `bridge` companion (`firewall.bind`) in one
/// transaction; `false` when there was neither.
pub fn remove_table(table: &str) -> Result<bool, FirewallError> {
    let mut sock = NfSocket::open().map_err(|e| firewall_error(e, table, None))?;
    match super::bridge::remove_both(&mut sock, table) {
        Ok(removed) => Ok(removed),
        Err(NlError::Kernel {
            errno: Errno::ENOENT,
            ..
        }) => Ok(false),
        Err(e) => Err(firewall_error(e, table, None)),
    }
}

/// The process ids of `dnsfence serve` processes in this network namespace, other than this
/// process.
pub fn running_servers() -> Vec<u32> {
    let own_ns = std::fs::read_link("/proc/thread-self/ns/net").ok();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let program = args.next().unwrap_or_default();
        let is_dnsfence = Path::new(&*String::from_utf8_lossy(program))
            .file_name()
            .is_some_and(|n| n == "dnsfence");
        if !is_dnsfence || args.next() != Some(b"serve".as_slice()) {
            continue;
        }
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        if own_ns.is_some() && ns == own_ns {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}
