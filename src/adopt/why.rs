//! `dnsfence why IP`: why may (or may not) a client reach this address? Answered from the
//! query logs: which names resolved to it, for whom, when, and until when the firewall
//! admitted it.
//!
//! The firewall admits an address for `clamp(TTL, ttl.min, ttl.max) + ttl.grace` from the
//! answer; with `--policy` that is the lifetime reported, without it the TTL the client was
//! told (a lower bound). A connection to an address after that is a program that ignores TTLs
//! (or caches answers); to an address no log mentions, a hard-coded address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::policy::TtlPolicy;

use super::logfile::LoggedQuery;

/// One name that resolved to the address for one client.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub name: String,
    pub client: IpAddr,
    pub queries: usize,
    pub first: SystemTime,
    pub last: SystemTime,
    /// When the latest admission ends.
    pub until: SystemTime,
    /// Some answers came through audit mode (a denial let through).
    pub audited: bool,
}

/// Every resolution of `addr` in `queries`, for `client` only if given, latest first.
pub fn why(
    queries: &[LoggedQuery],
    addr: IpAddr,
    client: Option<IpAddr>,
    ttl: Option<&TtlPolicy>,
) -> Vec<Resolution> {
    let addr = addr.to_canonical();
    let client = client.map(|c| c.to_canonical());
    let mut found: BTreeMap<(String, IpAddr), Resolution> = BTreeMap::new();
    for query in queries {
        if client.is_some_and(|c| c != query.client.to_canonical()) {
            continue;
        }
        let Some(answer) = query.answers.iter().find(|a| a.addr.to_canonical() == addr) else {
            continue;
        };
        let told = Duration::from_secs(u64::from(answer.ttl));
        let lifetime = match ttl {
            Some(ttl) => told.clamp(ttl.min, ttl.max.max(ttl.min)) + ttl.grace,
            None => told,
        };
        let until = query.time.checked_add(lifetime).unwrap_or(query.time);
        let entry = found
            .entry((query.bare_name().to_owned(), query.client))
            .or_insert_with(|| Resolution {
                name: query.bare_name().to_owned(),
                client: query.client,
                queries: 0,
                first: query.time,
                last: query.time,
                until,
                audited: false,
            });
        entry.queries += 1;
        entry.first = entry.first.min(query.time);
        entry.last = entry.last.max(query.time);
        entry.until = entry.until.max(until);
        entry.audited |= query.audit;
    }
    let mut list: Vec<Resolution> = found.into_values().collect();
    list.sort_by(|a, b| b.until.cmp(&a.until).then_with(|| a.name.cmp(&b.name)));
    list
}

/// The answer in words, judged at `now`.
pub fn report(
    addr: IpAddr,
    client: Option<IpAddr>,
    found: &[Resolution],
    now: SystemTime,
    with_policy: bool,
) -> String {
    let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let whom = client.map_or_else(|| "any client".to_owned(), |c| c.to_string());
    let mut out = String::new();
    if found.is_empty() {
        let _ = writeln!(
            out,
            "{addr}: never resolved for {whom} in these logs: a connection to it is to an address \
             the program knew by itself (hard-coded, or from elsewhere), and the firewall drops it"
        );
        return out;
    }
    let open = found.iter().any(|r| r.until > now);
    let _ = writeln!(
        out,
        "{addr}: {} for {whom}",
        if open {
            "admitted now"
        } else {
            "no longer admitted: every admission has expired"
        }
    );
    for r in found {
        let state = if r.until > now {
            format!("admitted until {}", time(r.until))
        } else {
            format!(
                "expired at {} (a program still using it ignores the TTL)",
                time(r.until)
            )
        };
        let _ = writeln!(
            out,
            "  {} for {}: {} quer{}, {} .. {}; {state}{}",
            r.name,
            r.client,
            r.queries,
            if r.queries == 1 { "y" } else { "ies" },
            time(r.first),
            time(r.last),
            if r.audited { " (audit mode)" } else { "" }
        );
    }
    if !with_policy {
        let _ = writeln!(
            out,
            "  (times are the TTLs the clients were told; with --policy, the firewall's \
             lifetimes: clamp(TTL, ttl.min, ttl.max) + ttl.grace)"
        );
    }
    out
}

/// The running server's answer (`GET /v1/why/IP[/CLIENT]`) in words.
pub fn report_live(answer: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let ip = text(&answer["ip"]);
    let whom = answer["client"]
        .as_str()
        .map_or_else(|| "any client".to_owned(), str::to_owned);
    let mut out = String::new();
    let explanation = answer["explanation"].as_str();
    let _ = match explanation {
        None => writeln!(out, "{ip}: admitted now for {whom}"),
        Some(e) => {
            let meaning = match e {
                "never-resolved" => {
                    "dnsfence never handed it out (as far as it remembers): a connection to it \
                     is to an address the program knew by itself (hard-coded, or from \
                     elsewhere), and the firewall drops it"
                }
                "expired" => {
                    "every admission has expired: a program still using it ignores the TTL"
                }
                "revoked" => "a reload or the end of a grant took it back",
                "other-client" => "admitted for other clients only (per_client)",
                _ => "",
            };
            writeln!(out, "{ip}: not admitted for {whom} ({e}): {meaning}")
        }
    };
    for a in answer["admissions"].as_array().into_iter().flatten() {
        let state = if a["live"].as_bool() == Some(true) {
            format!("admitted until {}", text(&a["until"]))
        } else {
            format!("expired at {}", text(&a["until"]))
        };
        let grant = a["grant"]
            .as_str()
            .map(|g| format!(", grant {g}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} for {} ({}, group {}, rule {}{grant}): {state}",
            text(&a["name"]),
            text(&a["client"]),
            text(&a["qtype"]),
            text(&a["group"]),
            text(&a["rule"]),
        );
    }
    for r in answer["revoked"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} for {}: revoked at {}",
            text(&r["name"]),
            text(&r["client"]),
            text(&r["revoked_at"]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::logfile::LoggedAnswer;

    fn q(client: &str, name: &str, addr: &str, at: u64, ttl: u32) -> LoggedQuery {
        LoggedQuery {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            client: client.parse().unwrap(),
            qname: format!("{name}."),
            qtype: "A".into(),
            decision: "allow".into(),
            reason: None,
            group: Some("default".into()),
            rule: Some(name.into()),
            error: None,
            audit: false,
            answers: vec![LoggedAnswer {
                addr: addr.parse().unwrap(),
                ttl,
            }],
        }
    }

    #[test]
    fn names_clients_and_lifetimes_of_an_address() {
        let log = vec![
            q("10.0.0.1", "a.example", "198.51.100.1", 100, 60),
            q("10.0.0.1", "a.example", "198.51.100.1", 200, 60),
            q("10.0.0.2", "b.example", "198.51.100.1", 150, 10),
            q("10.0.0.1", "c.example", "198.51.100.9", 150, 10),
        ];
        let ttl = TtlPolicy::default();
        let found = why(&log, "198.51.100.1".parse().unwrap(), None, Some(&ttl));
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].name, "a.example");
        assert_eq!(found[0].queries, 2);
        // clamp(60, 30, 3600) + 30 after the last answer.
        assert_eq!(
            found[0].until,
            SystemTime::UNIX_EPOCH + Duration::from_secs(290)
        );
        // clamp(10, 30, 3600) + 30
        assert_eq!(
            found[1].until,
            SystemTime::UNIX_EPOCH + Duration::from_secs(210)
        );
        let only = why(
            &log,
            "198.51.100.1".parse().unwrap(),
            Some("10.0.0.2".parse().unwrap()),
            None,
        );
        assert_eq!(only.len(), 1);
        let text = report(
            "198.51.100.1".parse().unwrap(),
            None,
            &found,
            SystemTime::UNIX_EPOCH + Duration::from_secs(250),
            true,
        );
        assert!(text.starts_with("198.51.100.1: admitted now"), "{text}");
        assert!(text.contains("expired at"), "{text}");
        let never = report(
            "192.0.2.7".parse().unwrap(),
            None,
            &[],
            SystemTime::now(),
            true,
        );
        assert!(never.contains("never resolved"), "{never}");
    }
}
