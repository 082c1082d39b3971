//! `limits`: how much of the server one client, and all of them, may use.

use super::super::Limits;
use super::super::diagnostic::Report;
use super::super::raw::Node;
use super::super::read;

const LIMIT_KEYS: &[&str] = &[
    "max_inflight",
    "max_inflight_per_client",
    "client_qps",
    "client_burst",
    "tcp_connections",
    "tcp_connections_per_client",
    "tcp_idle_timeout",
];

pub(super) fn read(r: &mut Report, node: Option<&Node>) -> Limits {
    let mut l = Limits::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "limits", LIMIT_KEYS)) else {
        return l;
    };
    let max = u64::from(u32::MAX);
    if let Some(n) = f
        .get("max_inflight")
        .and_then(|n| read::integer(r, n, "limits.max_inflight", 1, max))
    {
        l.max_inflight = usize::try_from(n).unwrap_or(usize::MAX);
    }
    match f.get("max_inflight_per_client") {
        Some(node) => {
            if let Some(n) = read::integer(r, node, "limits.max_inflight_per_client", 1, max) {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > l.max_inflight {
                    r.error(
                        node.pos,
                        format!(
                            "limits.max_inflight_per_client ({n}) is above limits.max_inflight \
                             ({}), so one client could still take every slot; write at most {}",
                            l.max_inflight, l.max_inflight
                        ),
                    );
                } else {
                    l.max_inflight_per_client = n;
                }
            }
        }
        // The default share never exceeds the whole.
        None => l.max_inflight_per_client = l.max_inflight_per_client.min(l.max_inflight),
    }
    if let Some(n) = f
        .get("client_qps")
        .and_then(|n| read::integer(r, n, "limits.client_qps", 0, max))
    {
        l.client_qps = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = f
        .get("client_burst")
        .and_then(|n| read::integer(r, n, "limits.client_burst", 0, max))
    {
        l.client_burst = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if l.client_qps > 0 && l.client_burst == 0 {
        let pos = f.get("client_burst").map_or(f.pos, |n| n.pos);
        r.error(
            pos,
            "limits.client_burst is 0 while client_qps is on, so no query would pass; \
             write a burst of at least 1 (or client_qps: 0 to turn the limit off)",
        );
    }
    if let Some(n) = f
        .get("tcp_connections")
        .and_then(|n| read::integer(r, n, "limits.tcp_connections", 1, max))
    {
        l.tcp_connections = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f
        .get("tcp_connections_per_client")
        .and_then(|n| read::integer(r, n, "limits.tcp_connections_per_client", 1, max))
    {
        l.tcp_connections_per_client = usize::try_from(n).unwrap_or(usize::MAX);
    }
    l.tcp_idle_timeout = read::nonzero_duration(
        r,
        f.get("tcp_idle_timeout"),
        "limits.tcp_idle_timeout",
        l.tcp_idle_timeout.as_secs(),
    );
    l
}
