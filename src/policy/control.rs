//! The parts of the policy that govern changing it while it runs: the control socket, what
//! a revocation does to open connections, and the limits of temporary grants.

use std::path::PathBuf;
use std::time::Duration;

/// The default control socket path (also what `dnsfence ctl` uses without `--socket` or
/// `--policy`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dnsfence/control.sock";

/// `control:`: the Unix socket `dnsfence ctl` talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPolicy {
    pub socket: PathBuf,
    /// Peers (by `SO_PEERCRED`) allowed to use the socket: their uid is listed here...
    pub allow_uids: Vec<u32>,
    /// ...or their primary gid is listed here.
    pub allow_gids: Vec<u32>,
}

impl Default for ControlPolicy {
    fn default() -> Self {
        ControlPolicy {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            allow_uids: vec![0],
            allow_gids: Vec::new(),
        }
    }
}

/// What happens to open connections to an address that is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectionsOnRevoke {
    /// Delete their conntrack entries: established streams end at once.
    #[default]
    Cut,
    /// Leave them: they live on, nothing new can start.
    Keep,
}

/// `revoke:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RevokePolicy {
    pub connections: ConnectionsOnRevoke,
}

/// `grants:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantPolicy {
    /// Open connections when a grant ends on its own (default keep: a download that started
    /// finishes, nothing new starts).
    pub on_expiry: ConnectionsOnRevoke,
    pub max_ttl: Duration,
    pub max_active: usize,
}

impl Default for GrantPolicy {
    fn default() -> Self {
        GrantPolicy {
            on_expiry: ConnectionsOnRevoke::Keep,
            max_ttl: Duration::from_secs(3600),
            max_active: 256,
        }
    }
}

/// Reading the three sections from the policy file (called by the schema).
pub(crate) mod read_sections {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::{ConnectionsOnRevoke, ControlPolicy, GrantPolicy, RevokePolicy};
    use crate::policy::diagnostic::Report;
    use crate::policy::raw::Node;
    use crate::policy::read;

    pub(crate) const CONTROL_KEYS: &[&str] = &["socket", "allow_uids", "allow_gids"];
    pub(crate) const REVOKE_KEYS: &[&str] = &["connections"];
    pub(crate) const GRANT_KEYS: &[&str] = &["on_expiry", "max_ttl", "max_active"];
    /// Longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
    const MAX_SOCKET_PATH: usize = 107;
    /// Largest `grants.max_active`.
    const MAX_ACTIVE_GRANTS: u64 = 4096;
    /// Longest `grants.max_ttl`.
    const MAX_GRANT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

    fn ids(r: &mut Report, node: &Node, what: &str) -> Vec<u32> {
        let Some(items) = read::list(r, node, what) else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|n| read::integer(r, n, what, 0, u64::from(u32::MAX - 1)))
            .filter_map(|n| u32::try_from(n).ok())
            .collect()
    }

    fn connections(r: &mut Report, node: &Node, what: &str) -> Option<ConnectionsOnRevoke> {
        read::choice(
            r,
            node,
            what,
            &[
                ("cut", ConnectionsOnRevoke::Cut),
                ("keep", ConnectionsOnRevoke::Keep),
            ],
        )
    }

    pub(crate) fn control(r: &mut Report, node: Option<&Node>) -> ControlPolicy {
        let mut control = ControlPolicy::default();
        let Some(f) = node.and_then(|n| read::fields(r, n, "control", CONTROL_KEYS)) else {
            return control;
        };
        if let Some(node) = f.get("socket")
            && let Some(path) = read::text(r, node, "control.socket")
        {
            if !path.starts_with('/') || path.len() > MAX_SOCKET_PATH || path.contains('\0') {
                r.error(
                    node.pos,
                    format!(
                        "control.socket {path:?} must be an absolute path of at most \
                         {MAX_SOCKET_PATH} bytes, e.g. /run/dnsfence/control.sock"
                    ),
                );
            } else {
                control.socket = PathBuf::from(path);
            }
        }
        if let Some(node) = f.get("allow_uids") {
            control.allow_uids = ids(r, node, "control.allow_uids");
        }
        if let Some(node) = f.get("allow_gids") {
            control.allow_gids = ids(r, node, "control.allow_gids");
        }
        if control.allow_uids.is_empty()
            && control.allow_gids.is_empty()
            && let Some(node) = f.get("allow_uids").or(f.get("allow_gids"))
        {
            r.warn(
                node.pos,
                "control.allow_uids and control.allow_gids are empty: no one can use the \
                 control socket (reload with SIGHUP only); add [0] for root",
            );
        }
        control
    }

    pub(crate) fn revoke(r: &mut Report, node: Option<&Node>) -> RevokePolicy {
        let mut revoke = RevokePolicy::default();
        let Some(f) = node.and_then(|n| read::fields(r, n, "revoke", REVOKE_KEYS)) else {
            return revoke;
        };
        if let Some(c) = f
            .get("connections")
            .and_then(|n| connections(r, n, "revoke.connections"))
        {
            revoke.connections = c;
        }
        revoke
    }

    pub(crate) fn grants(r: &mut Report, node: Option<&Node>) -> GrantPolicy {
        let mut grants = GrantPolicy::default();
        let Some(f) = node.and_then(|n| read::fields(r, n, "grants", GRANT_KEYS)) else {
            return grants;
        };
        if let Some(c) = f
            .get("on_expiry")
            .and_then(|n| connections(r, n, "grants.on_expiry"))
        {
            grants.on_expiry = c;
        }
        if let Some(node) = f.get("max_ttl")
            && let Some(d) = read::duration(r, node, "grants.max_ttl")
        {
            if d.is_zero() || d > MAX_GRANT_TTL {
                r.error(
                    node.pos,
                    "grants.max_ttl must be more than 0 and at most 7d; write a duration such \
                     as \"1h\"",
                );
            } else {
                grants.max_ttl = d;
            }
        }
        if let Some(n) = f
            .get("max_active")
            .and_then(|n| read::integer(r, n, "grants.max_active", 0, MAX_ACTIVE_GRANTS))
        {
            grants.max_active = usize::try_from(n).unwrap_or(0);
        }
        grants
    }
}
