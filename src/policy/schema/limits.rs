//! `limits`: how much of the server one client, and all of them, may use.

use super::super::Limits;
use super::super::diagnostic::Report;
use super::super::raw::Node;
use super::super::read;
use super::super::validate;

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
    l.max_inflight_per_client = Limits::default_inflight_share(l.max_inflight);
    if let Some(n) = f
        .get("max_inflight_per_client")
        .and_then(|n| read::integer(r, n, "limits.max_inflight_per_client", 1, max))
    {
        l.max_inflight_per_client = usize::try_from(n).unwrap_or(usize::MAX);
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
    l.tcp_idle_timeout = read::duration_in(
        r,
        f.get("tcp_idle_timeout"),
        "limits.tcp_idle_timeout",
        validate::TCP_IDLE_TIMEOUT_RANGE,
        l.tcp_idle_timeout,
    );
    super::report(r, &f, validate::limits_problems(&l));
    l
}
