//! Why was it dropped? Each packet the firewall dropped and logged to its NFLOG group, explained
//! from what dnsfence admitted, and written to the query log.
//!
//! ```text
//!  kernel: drop rule ─ log group N ─► DropReader (firewall/, raw facts: src, dst, proto, dport)
//!        ─► this module's reader thread ─► judge() against the admitted index (pipeline/)
//!        ─► deduplicated ─► {"event":"drop", ...} in the query log, drops_total{explanation}
//! ```
//!
//! The firewall knows addresses, not names; the pipeline's [`AdmittedIndex`] remembers, per
//! address, every answer that handed it out (client, name, until when) and the justifications
//! a reload or a grant's end took back. [`judge`] turns that history into one explanation:
//!
//! | explanation | when |
//! |---|---|
//! | `dns-bypass` | TCP or UDP to port 53 or 853 of anything but dnsfence |
//! | `revoked` | the address was admitted for this client, and a reload or a grant's end took it back |
//! | `expired` | it was admitted for this client until a time now past: the program ignores TTLs |
//! | `other-client` | with `per_client`, it is (or was) admitted for other clients only |
//! | `never-resolved` | dnsfence never handed it out (as far as its bounded memory goes): a hard-coded address |
//!
//! One reader thread, blocking on the netlink socket with a short timeout so that it notices
//! the stop flag. The kernel rule is rate-limited already; on top, each (client, destination,
//! protocol, port) is written once per [`DEDUP_WINDOW`] (a connect's SYN retries, a burst),
//! remembered in a map of at most [`MAX_REMEMBERED`] keys.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::firewall::{DropReader, DroppedPacket};
use crate::metrics::DropCounts;
use crate::pipeline::Pipeline;
use crate::pipeline::admitted::{History, Justification};
use crate::querylog::{EventRecord, QueryLog};

/// A drop of the same (client, destination, protocol, port) is written once per this window.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(10);
/// Keys remembered for deduplication, at most.
pub const MAX_REMEMBERED: usize = 4096;
/// How long one read waits before the thread looks at its stop flag again.
const READ_WAIT: Duration = Duration::from_millis(200);
/// Ports that are DNS (plain, and over TLS or QUIC) whatever the policy says.
const DNS_PORTS: [u16; 2] = [53, 853];
/// Names listed in one drop line, at most.
const MAX_NAMES: usize = 8;

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Explanation {
    NeverResolved,
    Expired,
    Revoked,
    OtherClient,
    DnsBypass,
}

impl Explanation {
    pub const ALL: [Explanation; 5] = [
        Explanation::NeverResolved,
        Explanation::Expired,
        Explanation::Revoked,
        Explanation::OtherClient,
        Explanation::DnsBypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Explanation::NeverResolved => "never-resolved",
            Explanation::Expired => "expired",
            Explanation::Revoked => "revoked",
            Explanation::OtherClient => "other-client",
            Explanation::DnsBypass => "dns-bypass",
        }
    }

    fn index(self) -> usize {
        Explanation::ALL
            .iter()
            .position(|e| *e == self)
            .unwrap_or_default()
    }
}

/// The judgement on one (client, destination, port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None`: the address is admitted for this client now (a packet to it passes).
    pub explanation: Option<Explanation>,
    /// The names behind it: those that expired or were revoked, those of the other clients,
    /// or for a DNS bypass those that resolved to the address, if any.
    pub names: Vec<String>,
    /// For `other-client`: the clients it is admitted for.
    pub clients: Vec<IpAddr>,
    /// For `expired`: when the last admission ended; for `revoked`: when it was taken back.
    pub at: Option<Instant>,
}

fn names<'a>(list: impl Iterator<Item = &'a Justification>) -> Vec<String> {
    let mut names: Vec<String> = list.map(Justification::bare_name).collect();
    names.sort();
    names.dedup();
    names.truncate(MAX_NAMES);
    names
}

/// Judges a packet from `client` to an address with `history`, to `dport` (TCP or UDP).
/// `per_client`: the allow sets pair clients with destinations.
pub fn judge(
    history: &History,
    client: IpAddr,
    dport: Option<u16>,
    per_client: bool,
    now: Instant,
) -> Verdict {
    let mine = per_client.then(|| client.to_canonical());
    let own: Vec<&Justification> = history.justifications_of(mine).collect();
    let own_revoked: Vec<_> = history.revoked_of(mine).collect();
    let latest_expiry = own.iter().map(|j| j.until).max();
    let latest_revoke = own_revoked.iter().map(|r| r.at).max();
    let mut verdict = Verdict {
        explanation: None,
        names: Vec::new(),
        clients: Vec::new(),
        at: None,
    };
    if dport.is_some_and(|p| DNS_PORTS.contains(&p)) {
        verdict.explanation = Some(Explanation::DnsBypass);
        verdict.names = names(history.justifications.iter());
        return verdict;
    }
    if latest_expiry.is_some_and(|until| until > now) {
        verdict.names = names(own.iter().copied().filter(|j| j.until > now));
        verdict.at = latest_expiry;
        return verdict;
    }
    match (latest_expiry, latest_revoke) {
        (expiry, Some(revoked)) if expiry.is_none_or(|until| revoked > until) => {
            verdict.explanation = Some(Explanation::Revoked);
            verdict.names = names(own_revoked.iter().map(|r| &r.why));
            verdict.at = Some(revoked);
        }
        (Some(until), _) => {
            verdict.explanation = Some(Explanation::Expired);
            verdict.names = names(own.iter().copied());
            verdict.at = Some(until);
        }
        _ if per_client && !history.justifications.is_empty() => {
            verdict.explanation = Some(Explanation::OtherClient);
            verdict.names = names(history.justifications.iter());
            let mut clients: Vec<IpAddr> =
                history.justifications.iter().map(|j| j.client).collect();
            clients.sort();
            clients.dedup();
            clients.truncate(MAX_NAMES);
            verdict.clients = clients;
        }
        _ => verdict.explanation = Some(Explanation::NeverResolved),
    }
    verdict
}

/// An `Instant` in the past or future as wall-clock time.
pub fn wall_clock(at: Instant, now: Instant) -> SystemTime {
    let wall = SystemTime::now();
    if at >= now {
        wall.checked_add(at - now).unwrap_or(wall)
    } else {
        wall.checked_sub(now - at).unwrap_or(wall)
    }
}

/// Drops explained so far, per explanation.
#[derive(Debug, Default)]
pub struct DropCounters([AtomicU64; 5]);

impl DropCounts for DropCounters {
    fn drop_counts(&self) -> Vec<(&'static str, u64)> {
        Explanation::ALL
            .iter()
            .zip(self.0.iter())
            .map(|(e, c)| (e.as_str(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

type Key = (IpAddr, IpAddr, u8, Option<u16>);

/// Explains packets and writes them to the query log, deduplicated.
pub struct Explainer {
    pipeline: Arc<Pipeline>,
    log: QueryLog,
    per_client: bool,
    recent: HashMap<Key, Instant>,
    counts: Arc<DropCounters>,
}

impl Explainer {
    pub fn new(pipeline: Arc<Pipeline>, log: QueryLog, per_client: bool) -> Explainer {
        Explainer {
            pipeline,
            log,
            per_client,
            recent: HashMap::new(),
            counts: Arc::default(),
        }
    }

    pub fn counts(&self) -> Arc<DropCounters> {
        Arc::clone(&self.counts)
    }

    /// Whether this key was written within the window; remembers it if not (bounded: a full
    /// map is pruned of old keys, and if still full the drop is written without remembering).
    fn seen_recently(&mut self, key: Key, now: Instant) -> bool {
        if let Some(at) = self.recent.get(&key)
            && now.duration_since(*at) < DEDUP_WINDOW
        {
            return true;
        }
        if self.recent.len() >= MAX_REMEMBERED && !self.recent.contains_key(&key) {
            self.recent
                .retain(|_, at| now.duration_since(*at) < DEDUP_WINDOW);
        }
        if self.recent.len() < MAX_REMEMBERED || self.recent.contains_key(&key) {
            self.recent.insert(key, now);
        }
        false
    }

    /// Explains one dropped packet; writes it unless the same one was written lately.
    pub fn packet(&mut self, packet: DroppedPacket, now: Instant) -> bool {
        let key = (packet.src, packet.dst, packet.proto, packet.dport);
        if self.seen_recently(key, now) {
            return false;
        }
        let history = self.pipeline.admitted().history(packet.dst);
        // A reload may have switched `per_client` since start: the firewall knows the current.
        let per_client = self
            .pipeline
            .admitter()
            .map_or(self.per_client, |a| a.per_client());
        let verdict = judge(&history, packet.src, packet.dport, per_client, now);
        // Admitted now, yet dropped: the kernel's element ran out moments before dnsfence's
        // record of it (they start a few microseconds apart). A TTL ignored all the same.
        let explanation = verdict.explanation.unwrap_or(Explanation::Expired);
        if let Some(counter) = self.counts.0.get(explanation.index()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let proto = match packet.proto {
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            1 => "icmp".to_owned(),
            58 => "icmpv6".to_owned(),
            n => n.to_string(),
        };
        let mut event = EventRecord::new("drop")
            .with("client", packet.src)
            .with("dst", packet.dst)
            .with("proto", proto)
            .with("dport", packet.dport)
            .with("explanation", explanation.as_str())
            .with("names", &verdict.names);
        if let Some(at) = verdict.at {
            let key = if explanation == Explanation::Revoked {
                "revoked_at"
            } else {
                "admitted_until"
            };
            event = event.with(
                key,
                humantime::format_rfc3339_seconds(wall_clock(at, now)).to_string(),
            );
        }
        if !verdict.clients.is_empty() {
            event = event.with("admitted_for", &verdict.clients);
        }
        self.log.event(event);
        true
    }
}

/// The reader thread and its stop flag.
pub struct DropExplainer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DropExplainer {
    /// Opens NFLOG `group` in the current network namespace (call it from the thread that
    /// runs in dnsfence's namespace, before the ruleset logs to it).
    pub fn open(group: u16) -> Result<DropReader, String> {
        DropReader::open(group, READ_WAIT)
    }

    /// Starts the thread that reads `reader` and explains what it reads.
    pub fn start(
        mut reader: DropReader,
        mut explainer: Explainer,
    ) -> std::io::Result<DropExplainer> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("dnsfence-drops".into())
            .spawn(move || {
                let mut packets = Vec::new();
                let mut failures = 0u32;
                while !stopping.load(Ordering::Acquire) {
                    packets.clear();
                    match reader.read(&mut packets) {
                        Ok(_) => failures = 0,
                        Err(error) => {
                            failures += 1;
                            if failures.is_power_of_two() {
                                tracing::warn!(%error, "cannot read dropped packets");
                            }
                            std::thread::sleep(READ_WAIT);
                        }
                    }
                    let now = Instant::now();
                    for packet in packets.drain(..) {
                        explainer.packet(packet, now);
                    }
                }
            })?;
        Ok(DropExplainer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (at most one read's wait), so that its handle on the
    /// query log is gone before the log is flushed.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::admitted::RevokedJustification;
    use hickory_proto::rr::{Name, RecordType};

    fn j(client: &str, name: &str, until: Instant) -> Justification {
        Justification {
            client: client.parse().unwrap(),
            name: Name::from_ascii(name).unwrap(),
            qtype: RecordType::A,
            group: "default".into(),
            rule: name.into(),
            grant: None,
            until,
        }
    }

    #[test]
    fn each_history_gets_its_explanation() {
        let now = Instant::now();
        let past = now - Duration::from_secs(5);
        let later = now + Duration::from_secs(60);
        let agent: IpAddr = "10.0.0.2".parse().unwrap();
        let empty = History::default();
        let judged = |h: &History, port: u16, per_client: bool| {
            judge(h, agent, Some(port), per_client, now).explanation
        };
        assert_eq!(judged(&empty, 443, false), Some(Explanation::NeverResolved));
        assert_eq!(judged(&empty, 53, false), Some(Explanation::DnsBypass));
        let expired = History {
            justifications: vec![j("10.0.0.2", "a.example.", past)],
            revoked: vec![],
        };
        let v = judge(&expired, agent, Some(443), false, now);
        assert_eq!(v.explanation, Some(Explanation::Expired));
        assert_eq!(v.names, ["a.example"]);
        assert_eq!(v.at, Some(past));
        assert_eq!(judged(&expired, 853, false), Some(Explanation::DnsBypass));
        let live = History {
            justifications: vec![j("10.0.0.2", "a.example.", later)],
            revoked: vec![],
        };
        assert_eq!(judged(&live, 443, false), None);
        let revoked = History {
            justifications: vec![],
            revoked: vec![RevokedJustification {
                addr: "198.51.100.1".parse().unwrap(),
                why: j("10.0.0.2", "a.example.", later),
                at: past,
            }],
        };
        assert_eq!(judged(&revoked, 443, false), Some(Explanation::Revoked));
        let others = History {
            justifications: vec![j("10.0.0.9", "b.example.", later)],
            revoked: vec![],
        };
        let v = judge(&others, agent, Some(443), true, now);
        assert_eq!(v.explanation, Some(Explanation::OtherClient));
        assert_eq!(v.clients, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        // Without per-client sets another client's admission admits everyone.
        assert_eq!(judged(&others, 443, false), None);
    }
}
