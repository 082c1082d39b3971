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

use std::net::Ipv4Addr;

use nix::errno::Errno;

use super::netlink::{Elem, NfSocket, NlError};
use super::ruleset::{Family, SetDef};

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
