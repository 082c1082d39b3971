//! The `bridge` table beside the main one (`firewall.bind`, see `ruleset::bind` for its
//! rules): bringing the kernel's to what the policy asks for inside the main table's own
//! transactions, reading it back, and what `firewall status` shows of it.
//!
//! The two tables share a name (`table inet dnsfence`, `table bridge dnsfence`) and a life:
//! created or replaced in the transaction that creates or replaces the main table (or, when
//! the main table is kept, in one of their own), and deleted with it (`on_exit: remove`,
//! `dnsfence firewall remove`). A policy without `bind` deletes a bridge table of that name
//! left by an earlier run, so bindings the policy no longer names do not linger.

use nix::errno::Errno;

use super::compare;
use super::netlink::{Batch, KernelTable, NfSocket, NlError, TableFamily};
use super::ruleset::BridgeLayout;

/// What the kernel holds of the bridge table, read before a transaction is built.
pub(crate) struct BridgePlan {
    existing: Option<KernelTable>,
}

impl BridgePlan {
    /// Reads `table bridge <table>` (a kernel without the bridge family has none).
    pub(crate) fn read(sock: &mut NfSocket, table: &str) -> Result<BridgePlan, NlError> {
        let existing = match sock.read_table_in(TableFamily::Bridge, table) {
            Ok(k) => k,
            // No bridge family in this kernel (module not built): there is no such table.
            Err(NlError::Kernel {
                errno: Errno::EAFNOSUPPORT | Errno::EOPNOTSUPP,
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        Ok(BridgePlan { existing })
    }

    /// Whether the kernel's bridge table is already the one wanted (or both are absent).
    pub(crate) fn is_current(&self, want: Option<&BridgeLayout>) -> bool {
        match (want, &self.existing) {
            (None, None) => true,
            (Some(w), Some(k)) => compare::compare_bridge(w, k).is_ok(),
            _ => false,
        }
    }

    /// Adds to `batch` what makes the kernel's bridge table the one wanted (delete the old
    /// one, create the new one), nothing when it already is; returns whether it added any.
    /// The batch is left on the `inet` family.
    pub(crate) fn add_to(&self, batch: &mut Batch, want: Option<&BridgeLayout>) -> bool {
        if self.is_current(want) {
            return false;
        }
        batch.switch_family(TableFamily::Bridge);
        if self.existing.is_some() {
            batch.del_table();
        }
        if let Some(layout) = want {
            batch.add_bridge_layout(layout);
        }
        batch.switch_family(TableFamily::Inet);
        true
    }
}

/// Reads the bridge table back after a commit: `Err` names the first difference.
pub(crate) fn read_back(
    sock: &mut NfSocket,
    table: &str,
    want: Option<&BridgeLayout>,
) -> Result<(), String> {
    let got = BridgePlan::read(sock, table).map_err(|e| e.to_string())?;
    match (want, &got.existing) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(format!(
            "table bridge {table} is still there, though firewall.bind is empty"
        )),
        (Some(_), None) => Err(format!("table bridge {table} is missing")),
        (Some(w), Some(k)) => compare::compare_bridge(w, k),
    }
}

/// Adds the deletion of `table bridge <table>` to `batch` if the kernel has one (deleting a
/// table that is not there would fail the whole transaction).
pub(crate) fn add_removal(
    sock: &mut NfSocket,
    batch: &mut Batch,
    table: &str,
) -> Result<bool, NlError> {
    let plan = BridgePlan::read(sock, table)?;
    Ok(plan.add_to(batch, None))
}

/// Deletes `table inet <table>` and `table bridge <table>`, whichever exist, in one
/// transaction; `false` when neither did.
pub(crate) fn remove_both(sock: &mut NfSocket, table: &str) -> Result<bool, NlError> {
    let inet = sock.table_handle(table)?.is_some();
    let mut batch = sock.begin(table);
    if inet {
        batch.del_table();
    }
    add_removal(sock, &mut batch, table)?;
    if batch.len() == 0 {
        return Ok(false);
    }
    sock.commit(batch)?;
    Ok(true)
}

/// The ports a bridge table binds, as its rules name them (`iifname "PORT"` first).
pub(crate) fn bound_ports(k: &KernelTable) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for rule in &k.rules {
        let name = rule
            .exprs
            .get(1)
            .filter(|e| e.name == "cmp")
            .and_then(|e| e.attrs.iter().find(|(kind, _)| *kind == 3))
            // NFTA_CMP_DATA holds one NFTA_DATA_VALUE: 4 bytes of header, then the name.
            .and_then(|(_, v)| v.get(4..))
            .map(|v| {
                let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                String::from_utf8_lossy(v.get(..end).unwrap_or_default()).into_owned()
            });
        if let Some(name) = name
            && !name.is_empty()
            && out.last() != Some(&name)
        {
            out.push(name);
        }
    }
    out
}

/// `table bridge <table>` as the kernel holds it: the ports it binds and its rule count;
/// `None` when there is none.
pub fn bridge_status(table: &str) -> Result<Option<(Vec<String>, usize)>, super::FirewallError> {
    let err = |e: NlError| super::firewall_error(e, table, None);
    let mut sock = NfSocket::open().map_err(err)?;
    let plan = BridgePlan::read(&mut sock, table).map_err(err)?;
    Ok(plan.existing.map(|k| (bound_ports(&k), k.rules.len())))
}
