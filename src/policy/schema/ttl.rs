//! `ttl`: how long an admitted address stays in the firewall.

use super::super::TtlPolicy;
use super::super::diagnostic::Report;
use super::super::raw::Node;
use super::super::read;

const TTL_KEYS: &[&str] = &["min", "max", "grace"];

pub(super) fn read(r: &mut Report, node: Option<&Node>) -> TtlPolicy {
    let mut ttl = TtlPolicy::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "ttl", TTL_KEYS)) else {
        return ttl;
    };
    if let Some(d) = f.get("min").and_then(|n| read::duration(r, n, "ttl.min")) {
        ttl.min = d;
    }
    ttl.max = read::nonzero_duration(r, f.get("max"), "ttl.max", ttl.max.as_secs());
    if let Some(d) = f
        .get("grace")
        .and_then(|n| read::duration(r, n, "ttl.grace"))
    {
        ttl.grace = d;
    }
    if ttl.min > ttl.max {
        let pos = f.get("min").map_or(f.pos, |n| n.pos);
        r.error(
            pos,
            format!(
                "ttl.min ({}s) is greater than ttl.max ({}s); make min at most max",
                ttl.min.as_secs_f64(),
                ttl.max.as_secs_f64()
            ),
        );
    }
    ttl
}
