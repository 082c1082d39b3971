//! `ttl`: how long an admitted address stays in the firewall.

use super::super::TtlPolicy;
use super::super::diagnostic::Report;
use super::super::raw::Node;
use super::super::read;
use super::super::validate;

const TTL_KEYS: &[&str] = &["min", "max", "grace"];

pub(super) fn read(r: &mut Report, node: Option<&Node>) -> TtlPolicy {
    let mut ttl = TtlPolicy::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "ttl", TTL_KEYS)) else {
        return ttl;
    };
    if let Some(d) = f.get("min").and_then(|n| read::duration(r, n, "ttl.min")) {
        ttl.min = d;
    }
    ttl.max = read::duration_in(r, f.get("max"), "ttl.max", validate::TTL_MAX_RANGE, ttl.max);
    ttl.grace = read::duration_in(
        r,
        f.get("grace"),
        "ttl.grace",
        validate::TTL_GRACE_RANGE,
        ttl.grace,
    );
    super::report(r, &f, validate::ttl_problems(&ttl));
    ttl
}
