//! `exfiltration`: limits on names that matched a wildcard rule.

use super::super::ExfiltrationLimits;
use super::super::diagnostic::Report;
use super::super::name;
use super::super::raw::Node;
use super::super::read;

const EXFILTRATION_KEYS: &[&str] = &[
    "max_name_length",
    "max_label_length",
    "wildcard_names_per_minute",
];

pub(super) fn read(r: &mut Report, node: Option<&Node>) -> ExfiltrationLimits {
    let mut e = ExfiltrationLimits::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "exfiltration", EXFILTRATION_KEYS)) else {
        return e;
    };
    let max_name = name::MAX_NAME_LEN as u64;
    let max_label = name::MAX_LABEL_LEN as u64;
    if let Some(n) = f
        .get("max_name_length")
        .and_then(|n| read::integer(r, n, "exfiltration.max_name_length", 1, max_name))
    {
        e.max_name_length = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f
        .get("max_label_length")
        .and_then(|n| read::integer(r, n, "exfiltration.max_label_length", 1, max_label))
    {
        e.max_label_length = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f.get("wildcard_names_per_minute").and_then(|n| {
        read::integer(
            r,
            n,
            "exfiltration.wildcard_names_per_minute",
            0,
            u64::from(u32::MAX),
        )
    }) {
        e.wildcard_names_per_minute = u32::try_from(n).unwrap_or(u32::MAX);
    }
    e
}
