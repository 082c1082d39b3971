//! The keys about watching dnsfence rather than filtering: `mode`/`audit` and `metrics`.
//!
//! Audit mode is how a policy is written from what an agent really does: denials are logged but
//! forwarded anyway. That is a hole by design, so it must close by itself: `mode: audit` is only
//! accepted with an end (`audit.until`), and a time already past simply means "enforce".
//!
//! The metrics endpoint is read-only, but it is one more listening socket, so it is only ever
//! bound to a loopback address: agents in other network namespaces, containers or VMs cannot
//! reach the host's loopback.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use super::super::diagnostic::{Pos, Report, quote};
use super::super::raw::{Node, Value};
use super::super::read;
use super::super::{MetricsPolicy, Mode};

const AUDIT_KEYS: &[&str] = &["until"];
const METRICS_KEYS: &[&str] = &["listen", "client_labels"];

/// `mode` and `audit` together: audit needs an end.
pub(super) fn mode(r: &mut Report, mode: Option<&Node>, audit: Option<&Node>, top: Pos) -> Mode {
    let auditing =
        mode.and_then(|n| read::choice(r, n, "mode", &[("enforce", false), ("audit", true)]));
    let until = audit
        .and_then(|n| read::fields(r, n, "audit", AUDIT_KEYS))
        .and_then(|f| {
            let node = f.required(r, "until", "until: \"2026-12-01T00:00:00Z\"")?;
            let text = read::text(r, node, "audit.until")?;
            match parse_rfc3339(text) {
                Ok(time) => Some((node.pos, time)),
                Err(message) => {
                    r.error(node.pos, format!("audit.until: {message}"));
                    None
                }
            }
        });
    match (auditing, until) {
        (Some(true), Some((pos, until))) => {
            if until <= SystemTime::now() {
                r.warn(
                    pos,
                    format!(
                        "audit.until {} has passed, so this policy enforces; move it into the \
                         future to audit, or write mode: enforce",
                        humantime::format_rfc3339_seconds(until)
                    ),
                );
            }
            Mode::Audit { until }
        }
        (Some(true), None) => {
            if audit.is_none() {
                r.error(
                    mode.map_or(top, |n| n.pos),
                    "mode: audit forwards what the policy denies, so it must end; add \
                     audit: {until: \"2026-12-01T00:00:00Z\"} (RFC 3339), or keep mode: enforce \
                     and start with `dnsfence serve --mode audit --audit-for 24h`",
                );
            }
            Mode::Enforce
        }
        (_, Some((pos, _))) => {
            r.error(
                pos,
                "audit.until is set but mode is not audit; add mode: audit, or remove the audit \
                 section",
            );
            Mode::Enforce
        }
        (_, None) => Mode::Enforce,
    }
}

/// Parses an RFC 3339 time such as `2026-12-01T00:00:00Z` or `2026-12-01T02:00:00+02:00`.
pub(crate) fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let hint = "write an RFC 3339 time such as \"2026-12-01T00:00:00Z\" or \
                \"2026-12-01T02:00:00+02:00\"";
    let text = text.trim();
    // humantime reads UTC (`Z`) only: take a numeric offset off first.
    let (local, offset) = match text.len().checked_sub(6).and_then(|at| text.get(at..)) {
        Some(tail)
            if (tail.starts_with('+') || tail.starts_with('-'))
                && tail.as_bytes().get(3) == Some(&b':') =>
        {
            let sign: i64 = if tail.starts_with('-') { -1 } else { 1 };
            let hours: i64 = tail[1..3]
                .parse()
                .map_err(|_| format!("{text:?}: {hint}"))?;
            let minutes: i64 = tail[4..6]
                .parse()
                .map_err(|_| format!("{text:?}: {hint}"))?;
            if hours > 23 || minutes > 59 {
                return Err(format!("{text:?} has an impossible offset; {hint}"));
            }
            (
                format!("{}Z", &text[..text.len() - 6]),
                sign * (hours * 3600 + minutes * 60),
            )
        }
        _ => (text.to_owned(), 0),
    };
    if !local.ends_with('Z') && !local.ends_with('z') {
        return Err(format!(
            "{text:?} has no time zone; add Z for UTC or an offset such as +02:00: {hint}"
        ));
    }
    let utc = humantime::parse_rfc3339(&local.to_ascii_uppercase())
        .map_err(|e| format!("{text:?} is not a valid time ({e}); {hint}"))?;
    let shift = Duration::from_secs(offset.unsigned_abs());
    let shifted = if offset >= 0 {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    };
    shifted.ok_or_else(|| format!("{text:?} is out of range; {hint}"))
}

/// The `metrics` section; `None` when absent (the endpoint is off by default).
pub(super) fn metrics(
    r: &mut Report,
    node: Option<&Node>,
    dns_listen: &[SocketAddr],
) -> Option<MetricsPolicy> {
    let node = node?;
    if node.value == Value::Null {
        return None;
    }
    let f = read::fields(r, node, "metrics", METRICS_KEYS)?;
    let listen_node = f.required(r, "listen", "listen: \"127.0.0.1:9153\"")?;
    let text = read::text(r, listen_node, "metrics.listen")?;
    let hint = "write a loopback address and port such as \"127.0.0.1:9153\" or \"[::1]:9153\"";
    let Ok(listen) = text.parse::<SocketAddr>() else {
        r.error(
            listen_node.pos,
            format!(
                "metrics.listen {} is not an address with a port; {hint}",
                quote(text)
            ),
        );
        return None;
    };
    if !listen.ip().is_loopback() {
        r.error(
            listen_node.pos,
            format!(
                "metrics.listen {} is not a loopback address, so agents could reach it (the \
                 counters tell what they and other clients do); {hint}, and let a local scraper \
                 or sidecar read it",
                quote(text)
            ),
        );
        return None;
    }
    if listen.port() == 0 {
        r.error(
            listen_node.pos,
            format!("metrics.listen {} has port 0; {hint}", quote(text)),
        );
        return None;
    }
    if dns_listen.iter().any(|dns| {
        dns.port() == listen.port() && (dns.ip() == listen.ip() || dns.ip().is_unspecified())
    }) {
        r.error(
            listen_node.pos,
            format!(
                "metrics.listen {} is also a DNS listen address; choose another port, such as 9153",
                quote(text)
            ),
        );
        return None;
    }
    let client_labels = f
        .get("client_labels")
        .and_then(|n| read::boolean(r, n, "metrics.client_labels"))
        .unwrap_or(false);
    Some(MetricsPolicy {
        listen,
        client_labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_with_z_and_offsets_mean_the_same_instant() {
        let z = parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2026-12-01T02:00:00+02:00").unwrap(), z);
        assert_eq!(parse_rfc3339("2026-11-30T19:30:00-04:30").unwrap(), z);
        assert_eq!(parse_rfc3339("2026-12-01t00:00:00z").unwrap(), z);
    }

    #[test]
    fn times_without_a_zone_or_out_of_range_are_refused() {
        for bad in [
            "2026-12-01T00:00:00",
            "2026-12-01",
            "tomorrow",
            "2026-13-01T00:00:00Z",
            "2026-12-01T00:00:00+25:00",
            "",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
