//! The policy file as a source that can change: reading it with its digest, the command-line
//! overrides that apply on every read, the keys that cannot change without a restart, and the
//! `--watch` poller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::policy::{Diagnostic, LogTarget, Mode, Policy, PolicyError};

/// How often `--watch` reads the file.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// `serve`'s command-line overrides, applied to every version of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<SocketAddr>,
    pub log: Option<String>,
    /// `--mode` / `--audit-for`, resolved at start.
    pub mode: Option<Mode>,
}

/// Where the policy comes from.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

/// A policy read and validated, with the SHA-256 of the bytes it was read from.
pub struct Loaded {
    pub policy: Policy,
    pub digest: String,
}

/// A policy that did not load, with the digest of what was read (when something was).
pub struct Invalid {
    pub error: PolicyError,
    pub digest: Option<String>,
}

/// The hex SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in hash {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

impl PolicySource {
    /// Reads the file once (following symlinks, as a ConfigMap mount needs), validates it
    /// exactly like `dnsfence check`, and applies the overrides.
    pub fn load(&self) -> Result<Loaded, Invalid> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(_) => {
                // The loader words the error (path, reason, what to check).
                return Err(Invalid {
                    error: load_error(&self.path),
                    digest: None,
                });
            }
        };
        let digest = digest(&bytes);
        let parsed = match std::str::from_utf8(&bytes) {
            Ok(text) => Policy::parse(text, &self.path),
            Err(_) => Err(load_error(&self.path)),
        };
        match parsed {
            Ok(mut policy) => {
                self.apply(&mut policy);
                Ok(Loaded { policy, digest })
            }
            Err(error) => Err(Invalid {
                error,
                digest: Some(digest),
            }),
        }
    }

    /// The digest of the file as it is now, or `None` when it cannot be read.
    pub fn current_digest(&self) -> Option<String> {
        std::fs::read(&self.path).ok().map(|bytes| digest(&bytes))
    }

    fn apply(&self, policy: &mut Policy) {
        if !self.overrides.listen.is_empty() {
            policy.listen = self.overrides.listen.clone();
        }
        match self.overrides.log.as_deref() {
            Some("-") => policy.log = LogTarget::Stdout,
            Some(path) => policy.log = LogTarget::File(PathBuf::from(path)),
            None => {}
        }
        if let Some(mode) = self.overrides.mode {
            policy.mode = mode;
        }
    }
}

fn load_error(path: &Path) -> PolicyError {
    match Policy::load(path) {
        Err(error) => error,
        // Readable now after all: report the race rather than inventing a position.
        Ok(_) => PolicyError {
            source: path.to_path_buf(),
            errors: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: "the file changed while it was read; reload again".into(),
            }],
            read_error: None,
        },
    }
}

/// The changes from `old` to `new` that only a restart can apply, one message each (empty when
/// the new policy can be swapped in live).
pub fn restart_only_changes(old: &Policy, new: &Policy) -> Vec<String> {
    let (of, nf) = (&old.firewall, &new.firewall);
    let (ol, nl) = (&old.limits, &new.limits);
    // (key, changed, why only a restart applies it). The firewall keys not here (hooks,
    // allow_cidrs, per_client, contain with its cgroups, inbound, max_addresses_per_answer,
    // max_elements_per_client) are applied by replacing the ruleset atomically (see
    // `ruleset_changed`).
    let keys = [
        (
            "listen",
            old.listen != new.listen,
            "the listening sockets are bound once, at start",
        ),
        (
            "log",
            old.log != new.log,
            "the query log is opened once, at start",
        ),
        (
            "upstreams",
            old.upstreams != new.upstreams,
            "the upstream sockets and their cache are set up once, at start",
        ),
        (
            "upstream_timeout",
            old.upstream_timeout != new.upstream_timeout,
            "the upstream stage is set up once, at start",
        ),
        (
            "limits.max_inflight",
            ol.max_inflight != nl.max_inflight,
            "the in-flight bound is set up once, at start",
        ),
        (
            "limits.tcp_connections, tcp_connections_per_client or tcp_idle_timeout",
            ol.tcp_connections != nl.tcp_connections
                || ol.tcp_connections_per_client != nl.tcp_connections_per_client
                || ol.tcp_idle_timeout != nl.tcp_idle_timeout,
            "the TCP front end is set up once, at start",
        ),
        (
            "firewall.enabled",
            of.enabled != nf.enabled,
            "the firewall is installed (or not) once, at start",
        ),
        (
            "firewall.table",
            of.table != nf.table,
            "the table is created once, at start (a reload replaces its contents, not its name)",
        ),
        (
            "firewall.mark",
            of.mark != nf.mark,
            "dnsfence's upstream sockets carry the mark they were opened with",
        ),
        (
            "firewall.set_size",
            of.set_size != nf.set_size,
            "the admission thread's maps are sized once, at start",
        ),
        (
            "firewall.log_denied or firewall.nflog_group",
            of.log_denied != nf.log_denied || of.nflog_group != nf.nflog_group,
            "the NFLOG reader that explains drops is bound once, at start",
        ),
        (
            "firewall.on_exit",
            of.on_exit != nf.on_exit,
            "what happens to the table at exit is fixed at start",
        ),
        (
            "control.socket",
            old.control.socket != new.control.socket,
            "the control socket is bound once, at start",
        ),
    ];
    keys.into_iter()
        .filter(|(_, changed, _)| *changed)
        .map(|(key, _, why)| {
            format!(
                "{key} changed: {why}; restart dnsfence to apply it (nothing of this reload was \
                 applied)"
            )
        })
        .collect()
}

/// Whether the firewall part changed in a way a reload applies by replacing the ruleset
/// (compared as a whole, so that a key added later is never silently ignored: the
/// replacement itself does nothing when the kernel's table already has the new layout).
pub fn ruleset_changed(old: &Policy, new: &Policy) -> bool {
    format!("{:?}", old.firewall) != format!("{:?}", new.firewall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_hex_sha256() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
