//! The query pipeline: one stage per concern, in the order a query meets them.
//!
//! ```text
//! request ─► decision ─► upstream ─► answer_filter ─► firewall admission ─► reply ─► query log
//!  (shape)   (policy)    (forward)   (chain, TTLs,     (kernel ACK before     (server)  (querylog)
//!                                     address guard)    the reply leaves)
//! ```
//!
//! [`Pipeline::answer`] runs the stages for one question and returns the reply to send together
//! with the log record describing it. Nothing here touches sockets: the server owns transports.

pub mod address_guard;
pub mod answer_filter;
pub mod decision;
pub mod limits;
pub mod request;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::sync::Semaphore;

use crate::firewall::Admitter;
use crate::policy::{CnameMode, DenyWith, Policy};
use crate::querylog::{LoggedAddress, QueryRecord};
use address_guard::AddressGuard;
use answer_filter::{AnswerContext, filter_answer};
use decision::{Decision, DenyReason, decide, is_wildcard};
use limits::{RateLimiter, WildcardBudget};
use request::Question;
use upstream::Upstreams;

/// The transport a query arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to send back: an rcode, the answer records and, for negative answers, the SOA.
#[derive(Debug, Clone)]
pub struct Reply {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub soa: Option<Record>,
}

impl Reply {
    fn empty(rcode: ResponseCode) -> Reply {
        Reply {
            rcode,
            answers: Vec::new(),
            soa: None,
        }
    }
}

/// Everything a query needs, shared by all of them.
pub struct Pipeline {
    policy: Arc<Policy>,
    upstreams: Upstreams,
    guard: AddressGuard,
    admitter: Option<Admitter>,
    rate: Option<RateLimiter>,
    budget: WildcardBudget,
    /// Queries waiting on an upstream or the firewall; beyond it new ones are refused at once
    /// rather than queued, so a flood costs memory in proportion to the limit, not the flood.
    in_flight: Semaphore,
}

impl Pipeline {
    pub fn new(policy: Arc<Policy>, upstreams: Upstreams, admitter: Option<Admitter>) -> Pipeline {
        let mut never: Vec<IpAddr> = policy.upstreams.iter().map(SocketAddr::ip).collect();
        never.extend(address_guard::host_addresses());
        let client_ranges: Vec<IpNet> =
            policy.clients.iter().flat_map(|g| g.from.clone()).collect();
        let guard = AddressGuard::new(&policy.deny_answers, &never)
            .with_served(address_guard::served_networks(
                &client_ranges,
                &policy.listen,
            ))
            .with_nat64(&policy.nat64_prefixes);
        Pipeline {
            rate: RateLimiter::new(&policy.limits),
            budget: WildcardBudget::new(policy.exfiltration),
            in_flight: Semaphore::new(policy.limits.max_inflight),
            policy,
            upstreams,
            guard,
            admitter,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The reply to a message that was rejected before reaching the policy.
    pub fn rejected(
        &self,
        client: SocketAddr,
        transport: Transport,
        question: Option<&Question>,
        rcode: ResponseCode,
        reason: DenyReason,
    ) -> (Reply, QueryRecord) {
        let mut record = new_record(client, transport, question);
        record.decision = "deny";
        record.reason = Some(reason.as_str());
        record.rcode = rcode;
        (Reply::empty(rcode), record)
    }

    /// Runs the whole pipeline for one question.
    pub async fn answer(
        &self,
        client: SocketAddr,
        transport: Transport,
        question: &Question,
    ) -> (Reply, QueryRecord) {
        let mut record = new_record(client, transport, Some(question));
        let client_ip = client.ip();
        let budget_key = limits::client_key(client_ip);
        if let Some(rate) = &self.rate
            && !rate.allow(budget_key, Instant::now())
        {
            return refuse(record, DenyReason::RateLimit);
        }

        // In audit mode a denial for `policy` or `qtype` goes on as if allowed (with no rule),
        // and the record keeps the reason it would have been denied for.
        let (group_name, rule) =
            match decide(&self.policy, client_ip, &question.name, question.qtype) {
                Decision::Allow { group, rule } => (group, Some(rule)),
                Decision::Deny(reason) if self.audits(reason, question) => {
                    record.audit = true;
                    record.reason = Some(reason.as_str());
                    (self.policy.group_for(client_ip).name.as_str(), None)
                }
                Decision::Deny(reason) => return self.deny(record, reason),
            };
        record.group = Some(group_name.to_owned());
        record.rule = rule.map(|rule| rule.pattern.clone());
        if let Some(rule) = rule
            && is_wildcard(rule)
        {
            let charged =
                self.budget
                    .charge(budget_key, &rule.pattern, &question.name, Instant::now());
            if let Err(exceeded) = charged {
                record.error = Some(exceeded.to_string());
                if !self.audits(DenyReason::ExfiltrationBudget, question) {
                    return self.deny(record, DenyReason::ExfiltrationBudget);
                }
                record.audit = true;
                record.reason = Some(DenyReason::ExfiltrationBudget.as_str());
            }
        }
        record.decision = if record.audit { "deny" } else { "allow" };
        let Ok(_in_flight) = self.in_flight.try_acquire() else {
            record.error = Some("too many queries in flight".to_owned());
            return refuse(record, DenyReason::RateLimit);
        };

        // The upstream gets the name in lower case: the letter case a client chooses would
        // otherwise reach the authoritative servers as one bit per letter, outside every budget.
        let forwarded = question.name.to_lowercase();
        let answer = match self.upstreams.resolve(&forwarded, question.qtype).await {
            Ok(answer) => answer,
            Err(failure) => {
                record.upstream = failure.upstream;
                record.error = Some(failure.reason);
                return servfail(record);
            }
        };
        record.upstream = Some(answer.upstream);

        let group = self.policy.group_for(client_ip);
        let allow_answers: Vec<IpNet> = rule
            .into_iter()
            .flat_map(|rule| rule.allow_answers.iter())
            .chain(group.allow_answers.iter())
            .copied()
            .collect();
        let name_allowed = |name: &Name| group.rules.find(name).is_some();
        let strict = |name: &Name| name == &question.name || group.rules.find(name).is_some();
        let cx = AnswerContext {
            qname: &question.name,
            qtype: question.qtype,
            ttl: self.policy.ttl,
            guard: &self.guard,
            allow_answers: &allow_answers,
            strict_chain: match self.policy.cname {
                CnameMode::Strict => Some(&strict),
                CnameMode::Follow => None,
            },
            name_allowed: &name_allowed,
            hints: self.policy.https_hints,
            max_per_family: usize::try_from(self.policy.firewall.addresses_per_answer())
                .unwrap_or(usize::MAX),
        };
        let filtered = filter_answer(&cx, &answer.answers);
        record.refused = filtered.refused_addresses.clone();
        if filtered.over_quota > 0 {
            record.error = Some(format!(
                "{} addresses beyond firewall.max_addresses_per_answer ({} per family) removed",
                filtered.over_quota,
                self.policy.firewall.addresses_per_answer()
            ));
        }
        if let Some(name) = &filtered.chain_violation {
            record.error = Some(format!("CNAME chain leaves the allowlist at {name}"));
            if !self.audits(DenyReason::Policy, question) {
                return self.deny(record, DenyReason::Policy);
            }
            record.audit = true;
            record.decision = "deny";
            record.reason.get_or_insert(DenyReason::Policy.as_str());
        }
        if filtered.stripped_to_nothing() {
            return self.deny(record, DenyReason::Rebinding);
        }

        if let Some(admitter) = &self.admitter
            && !filtered.admit.is_empty()
            && let Err(error) = admitter.admit(client_ip, &filtered.admit).await
        {
            record.error = Some(format!("firewall admission failed: {error}"));
            return servfail(record);
        }

        record.rcode = answer.rcode;
        record.answers = logged_addresses(&filtered.records);
        // A negative answer's SOA says which zone denies the name: it must be an ancestor of
        // the question or of a name of its chain, or it is a record for another name.
        let mut soa = answer.soa.filter(|soa| {
            soa.name.zone_of(&question.name)
                || filtered.records.iter().any(|r| {
                    soa.name.zone_of(&r.name)
                        || matches!(&r.data, RData::CNAME(target) if soa.name.zone_of(&target.0))
                })
        });
        if let Some(soa) = &mut soa {
            soa.ttl = answer_filter::reply_ttl(soa.ttl, &self.policy.ttl);
        }
        let reply = Reply {
            rcode: answer.rcode,
            answers: filtered.records,
            soa,
        };
        (reply, record)
    }

    /// Whether audit mode lets a query denied for `reason` through, now. Special-use names,
    /// rebinding, malformed input and rate limits are never audited (they protect dnsfence and
    /// the internal network, not the policy's intent), nor are meta query types no policy
    /// could allow.
    fn audits(&self, reason: DenyReason, question: &Question) -> bool {
        let auditable = match reason {
            DenyReason::Policy | DenyReason::ExfiltrationBudget => true,
            DenyReason::Qtype => !is_meta_qtype(question.qtype),
            _ => false,
        };
        auditable && self.policy.mode.audits_at(SystemTime::now())
    }

    fn deny(&self, mut record: QueryRecord, reason: DenyReason) -> (Reply, QueryRecord) {
        let rcode = match self.policy.deny_with {
            DenyWith::NxDomain => ResponseCode::NXDomain,
            DenyWith::Refused => ResponseCode::Refused,
        };
        record.decision = "deny";
        record.reason = Some(reason.as_str());
        record.audit = false;
        record.rcode = rcode;
        (Reply::empty(rcode), record)
    }
}

/// Refuses a query for load reasons: REFUSED whatever `deny_with` says, since the name itself
/// may well be allowed.
fn refuse(mut record: QueryRecord, reason: DenyReason) -> (Reply, QueryRecord) {
    record.decision = "deny";
    record.reason = Some(reason.as_str());
    record.rcode = ResponseCode::Refused;
    (Reply::empty(ResponseCode::Refused), record)
}

/// Types whose answers cannot be filtered (the policy refuses them in `qtypes`).
fn is_meta_qtype(qtype: RecordType) -> bool {
    matches!(
        qtype,
        RecordType::ANY | RecordType::AXFR | RecordType::IXFR | RecordType::OPT | RecordType::TSIG
    )
}

fn servfail(mut record: QueryRecord) -> (Reply, QueryRecord) {
    record.rcode = ResponseCode::ServFail;
    (Reply::empty(ResponseCode::ServFail), record)
}

fn new_record(
    client: SocketAddr,
    transport: Transport,
    question: Option<&Question>,
) -> QueryRecord {
    QueryRecord {
        time: SystemTime::now(),
        client: client.ip(),
        port: client.port(),
        transport: transport.as_str(),
        qname: question.map(|q| q.name.to_string()).unwrap_or_default(),
        qtype: question.map(|q| q.qtype.to_string()).unwrap_or_default(),
        decision: "deny",
        group: None,
        rule: None,
        reason: None,
        rcode: ResponseCode::NoError,
        answers: Vec::new(),
        refused: Vec::new(),
        upstream: None,
        error: None,
        truncated: false,
        audit: false,
        latency_us: 0,
    }
}

/// The addresses of the records handed out, for the log.
fn logged_addresses(records: &[Record]) -> Vec<LoggedAddress> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(LoggedAddress {
                addr: IpAddr::V4(a.0),
                ttl: r.ttl,
            }),
            RData::AAAA(aaaa) => Some(LoggedAddress {
                addr: IpAddr::V6(aaaa.0),
                ttl: r.ttl,
            }),
            _ => None,
        })
        .collect()
}
