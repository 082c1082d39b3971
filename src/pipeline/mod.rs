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
//!
//! # Generations
//!
//! Everything a policy decides with (the policy, the address guard built from it, the rate and
//! wildcard budgets, the active [`grants`]) is one immutable [`Generation`]. Each query loads the
//! current generation once, at its start, and keeps it to the end: a reload or a grant swaps in
//! a new generation for the queries that start afterwards while those in flight finish under the
//! one they started with. [`Pipeline::replace`] returns the old generation so that the caller can
//! wait for its last query before judging what it admitted (see [`admitted`]).

pub mod address_guard;
pub mod admitted;
pub mod answer_filter;
pub mod decision;
pub mod grants;
pub mod limits;
pub mod local_source;
pub mod request;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::sync::Semaphore;

use crate::firewall::Admitter;
use crate::policy::{CnameMode, DenyWith, Group, Policy};
use crate::querylog::{LoggedAddress, LoggedAddresses, PolicyTag, QueryRecord, ShortText};
use address_guard::{AddressGuard, AddressVerdict};
use admitted::{AdmittedIndex, Justification};
use answer_filter::{AnswerContext, filter_answer};
use decision::{Decision, DenyReason, decide, is_special_use, is_wildcard};
use grants::{Grant, Grants};
use limits::{InflightShares, RateLimiter, WildcardBudget};
use local_source::HostAddresses;
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

/// Everything one policy decides with; immutable, swapped whole (see the module docs).
pub struct Generation {
    pub policy: Arc<Policy>,
    /// SHA-256 of the policy file, hex.
    pub digest: Arc<str>,
    pub tag: PolicyTag,
    pub grants: Arc<Grants>,
    guard: AddressGuard,
    rate: Arc<Option<RateLimiter>>,
    budget: Arc<WildcardBudget>,
}

impl Generation {
    /// The first generation of a server.
    pub fn new(policy: Arc<Policy>, digest: &str) -> Generation {
        Generation {
            guard: guard_for(&policy),
            rate: Arc::new(RateLimiter::new(&policy.limits)),
            budget: Arc::new(WildcardBudget::new(policy.exfiltration)),
            digest: digest.into(),
            tag: PolicyTag::of_hex(digest),
            grants: Arc::new(Grants::default()),
            policy,
        }
    }

    /// The generation for a reloaded policy: the grants carry over, and so do the per-client
    /// budgets when their limits did not change (a reload must not hand every agent a fresh
    /// budget).
    pub fn reloaded(&self, policy: Arc<Policy>, digest: &str) -> Generation {
        let rate = if policy.limits == self.policy.limits {
            self.rate.clone()
        } else {
            Arc::new(RateLimiter::new(&policy.limits))
        };
        let budget = if policy.exfiltration == self.policy.exfiltration {
            self.budget.clone()
        } else {
            Arc::new(WildcardBudget::new(policy.exfiltration))
        };
        Generation {
            guard: guard_for(&policy),
            rate,
            budget,
            digest: digest.into(),
            tag: PolicyTag::of_hex(digest),
            grants: self.grants.clone(),
            policy,
        }
    }

    /// The same policy with other grants.
    pub fn with_grants(&self, grants: Grants) -> Generation {
        Generation {
            policy: self.policy.clone(),
            digest: self.digest.clone(),
            tag: self.tag,
            grants: Arc::new(grants),
            guard: self.guard.clone(),
            rate: self.rate.clone(),
            budget: self.budget.clone(),
        }
    }

    /// The policy's decision, then the grants' for a name no rule allows. This is the decision
    /// of every query and of every revocation.
    pub fn decide(
        &self,
        client: IpAddr,
        name: &Name,
        qtype: RecordType,
        now: Instant,
    ) -> (Decision<'_>, Option<&Grant>) {
        let decision = decide(&self.policy, client, name, qtype);
        let no_rule = match decision {
            Decision::Deny(DenyReason::Policy) => true,
            // An unmatched `.test` name is reported as special-use; a grant may name one.
            Decision::Deny(DenyReason::SpecialUse) => !is_special_use(name),
            _ => false,
        };
        if !no_rule || self.grants.is_empty() {
            return (decision, None);
        }
        let group = self.policy.group_for(client);
        match self.grants.find(client, &group.name, name, now) {
            Some(_) if !self.policy.qtypes.contains(&qtype) => {
                (Decision::Deny(DenyReason::Qtype), None)
            }
            Some((grant, rule)) => (
                Decision::Allow {
                    group: &group.name,
                    rule,
                },
                Some(grant),
            ),
            None => (decision, None),
        }
    }

    /// Whether `name` is allowed for `client` in `group` by a rule or a live grant (CNAME
    /// chains and HTTPS targets).
    fn allows(&self, client: IpAddr, group: &Group, name: &Name, now: Instant) -> bool {
        group.rules.find(name).is_some()
            || self.grants.find(client, &group.name, name, now).is_some()
    }

    /// Whether an admitted address is still justified: the question is still allowed and the
    /// address guard, with the allowing rule's and group's `allow_answers`, still permits it.
    pub fn still_justifies(&self, addr: IpAddr, why: &Justification, now: Instant) -> bool {
        let (decision, _) = self.decide(why.client, &why.name, why.qtype, now);
        let rule = match decision {
            Decision::Allow { rule, .. } => Some(rule),
            // Audit mode admits what it would deny; until it ends, so does revocation.
            Decision::Deny(reason) if audits_type(&self.policy, reason, why.qtype) => None,
            Decision::Deny(_) => return false,
        };
        let group = self.policy.group_for(why.client);
        let allowed: Vec<IpNet> = rule
            .into_iter()
            .flat_map(|rule| rule.allow_answers.iter())
            .chain(group.allow_answers.iter())
            .copied()
            .collect();
        self.guard.verdict(addr, &allowed) == AddressVerdict::Permitted
    }
}

fn guard_for(policy: &Policy) -> AddressGuard {
    let mut never: Vec<IpAddr> = policy.upstreams.iter().map(SocketAddr::ip).collect();
    never.extend(address_guard::host_addresses());
    let client_ranges: Vec<IpNet> = policy.clients.iter().flat_map(|g| g.from.clone()).collect();
    AddressGuard::new(&policy.deny_answers, &never)
        .with_served(address_guard::served_networks(
            &client_ranges,
            &policy.listen,
        ))
        .with_nat64(&policy.nat64_prefixes)
}

/// Everything a query needs, shared by all of them.
pub struct Pipeline {
    current: ArcSwap<Generation>,
    upstreams: Upstreams,
    admitter: Option<Admitter>,
    admitted: AdmittedIndex,
    /// Queries waiting on an upstream or the firewall; beyond it new ones are refused at once
    /// rather than queued, so a flood costs memory in proportion to the limit, not the flood.
    in_flight: Semaphore,
    /// Each client's share of `in_flight` (`limits.max_inflight_per_client`), keyed as the
    /// budgets are, so one agent or one slow zone cannot take every slot.
    in_flight_per_client: InflightShares,
    /// This host's addresses: a query from one of them is the loopback client (see
    /// [`local_source`]).
    host: Arc<HostAddresses>,
}

impl Pipeline {
    pub fn new(
        generation: Generation,
        upstreams: Upstreams,
        admitter: Option<Admitter>,
    ) -> Pipeline {
        let policy = &generation.policy;
        // Both allow sets together hold at most this many live elements.
        let max_addresses = usize::try_from(policy.firewall.set_size)
            .unwrap_or(usize::MAX)
            .saturating_mul(2);
        Pipeline {
            in_flight: Semaphore::new(policy.limits.max_inflight),
            in_flight_per_client: InflightShares::default(),
            admitted: AdmittedIndex::new(max_addresses),
            current: ArcSwap::from_pointee(generation),
            upstreams,
            admitter,
            host: Arc::new(HostAddresses::read()),
        }
    }

    /// This host's addresses as the pipeline knows them, for whoever keeps them current.
    pub fn host_addresses(&self) -> Arc<HostAddresses> {
        self.host.clone()
    }

    /// The policy new queries are decided by.
    pub fn policy(&self) -> Arc<Policy> {
        self.current.load().policy.clone()
    }

    /// The generation new queries start with.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Swaps in `next` for the queries that start from now on; returns the previous one,
    /// which the queries in flight keep until they finish.
    pub fn replace(&self, next: Generation) -> Arc<Generation> {
        self.current.swap(Arc::new(next))
    }

    /// What was admitted and why.
    pub fn admitted(&self) -> &AdmittedIndex {
        &self.admitted
    }

    /// The firewall handle, when the firewall is on.
    pub fn admitter(&self) -> Option<&Admitter> {
        self.admitter.as_ref()
    }

    /// The upstream stage's counters (cache, reply times), for metrics.
    pub fn upstream_stats(&self) -> upstream::stats::UpstreamStats {
        self.upstreams.stats()
    }

    /// Drops the cached answers for names `keep` rejects (names a reload or a grant's end
    /// denied), so that nothing of theirs is served from memory if they are allowed again.
    pub fn forget_cached(&self, keep: impl Fn(&Name) -> bool) {
        self.upstreams.retain_cached(keep);
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
        record.policy = self.current.load().tag;
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
        // Loaded once: this query is decided, filtered and admitted under this policy to the
        // end, whatever reloads meanwhile.
        let generation = self.current.load_full();
        let generation = generation.as_ref();
        let policy = generation.policy.as_ref();
        let mut record = new_record(client, transport, Some(question));
        record.policy = generation.tag;
        // A local process that binds one of this host's addresses (inside some group's range)
        // is still a local process: it gets loopback's group, budgets and per-client key.
        let client_ip = self.host.client_for(client.ip());
        let budget_key = limits::client_key(client_ip);
        let started = Instant::now();
        if let Some(rate) = generation.rate.as_ref()
            && !rate.allow(budget_key, started)
        {
            return refuse(record, DenyReason::RateLimit);
        }

        // In audit mode a denial for `policy` or `qtype` goes on as if allowed (with no rule),
        // and the record keeps the reason it would have been denied for.
        let (decision, grant) =
            generation.decide(client_ip, &question.name, question.qtype, started);
        let (group_name, rule) = match decision {
            Decision::Allow { group, rule } => (group, Some(rule)),
            Decision::Deny(reason) if audits(policy, reason, question) => {
                record.audit = true;
                record.reason = Some(reason.as_str());
                (policy.group_for(client_ip).name.as_str(), None)
            }
            Decision::Deny(reason) => return deny(policy, record, reason),
        };
        record.group = Some(ShortText::from(group_name));
        record.rule = rule.map(|rule| ShortText::from(rule.pattern.as_str()));
        record.grant = grant.map(|grant| grant.id);
        if let Some(rule) = rule
            && is_wildcard(rule)
        {
            let charged =
                generation
                    .budget
                    .charge(budget_key, &rule.pattern, &question.name, Instant::now());
            if let Err(exceeded) = charged {
                record.error = Some(exceeded.to_string());
                if !audits(policy, DenyReason::ExfiltrationBudget, question) {
                    return deny(policy, record, DenyReason::ExfiltrationBudget);
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
        // Taken after the global permit, so the map of counts holds at most max_inflight
        // clients; released when this future ends or is dropped.
        let share = policy.limits.max_inflight_per_client;
        let _client_slot = match self.in_flight_per_client.try_take(budget_key, share) {
            Ok(slot) => slot,
            Err(held) => {
                record.error = Some(format!(
                    "client has {held} queries in flight (limits.max_inflight_per_client {share})"
                ));
                return refuse(record, DenyReason::RateLimit);
            }
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

        let group = policy.group_for(client_ip);
        let allow_answers: Vec<IpNet> = rule
            .into_iter()
            .flat_map(|rule| rule.allow_answers.iter())
            .chain(group.allow_answers.iter())
            .copied()
            .collect();
        let name_allowed = |name: &Name| generation.allows(client_ip, group, name, started);
        let strict = |name: &Name| {
            name == &question.name || generation.allows(client_ip, group, name, started)
        };
        let cx = AnswerContext {
            qname: &question.name,
            qtype: question.qtype,
            ttl: policy.ttl,
            guard: &generation.guard,
            allow_answers: &allow_answers,
            strict_chain: match policy.cname {
                CnameMode::Strict => Some(&strict),
                CnameMode::Follow => None,
            },
            name_allowed: &name_allowed,
            hints: policy.https_hints,
            max_per_family: usize::try_from(policy.firewall.addresses_per_answer())
                .unwrap_or(usize::MAX),
        };
        let mut filtered = filter_answer(&cx, &answer.answers);
        record.refused = filtered.refused_addresses.clone();
        if filtered.over_quota > 0 {
            record.error = Some(format!(
                "{} addresses beyond firewall.max_addresses_per_answer ({} per family) removed",
                filtered.over_quota,
                policy.firewall.addresses_per_answer()
            ));
        }
        if let Some(name) = &filtered.chain_violation {
            record.error = Some(format!("CNAME chain leaves the allowlist at {name}"));
            if !audits(policy, DenyReason::Policy, question) {
                return deny(policy, record, DenyReason::Policy);
            }
            record.audit = true;
            record.decision = "deny";
            record.reason.get_or_insert(DenyReason::Policy.as_str());
        }
        if filtered.stripped_to_nothing() {
            return deny(policy, record, DenyReason::Rebinding);
        }
        if let Some(grant) = grant {
            // Nothing admitted under a grant outlives its end plus the grace period, even if
            // dnsfence is not there to revoke it.
            let end = grant
                .expires
                .checked_add(policy.ttl.grace)
                .map_or(Duration::ZERO, |end| {
                    end.saturating_duration_since(Instant::now())
                });
            for (_, lifetime) in &mut filtered.admit {
                *lifetime = (*lifetime).min(end);
            }
        }

        if let Some(admitter) = &self.admitter
            && !filtered.admit.is_empty()
        {
            if let Err(error) = admitter.admit(client_ip, &filtered.admit).await {
                record.error = Some(format!("firewall admission failed: {error}"));
                return servfail(record);
            }
            let now = Instant::now();
            let group: Arc<str> = group_name.into();
            // Admitted by audit mode: no rule allowed it.
            let rule: Arc<str> = rule.map_or("(audit)", |r| r.pattern.as_str()).into();
            let name = question.name.to_lowercase();
            for &(addr, lifetime) in &filtered.admit {
                let why = Justification {
                    client: client_ip.to_canonical(),
                    name: name.clone(),
                    qtype: question.qtype,
                    group: group.clone(),
                    rule: rule.clone(),
                    grant: grant.map(|g| g.id),
                    until: now + crate::firewall::admitted_lifetime(lifetime),
                };
                self.admitted.record(addr, why, now);
            }
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
            soa.ttl = answer_filter::reply_ttl(soa.ttl, &policy.ttl);
        }
        let reply = Reply {
            rcode: answer.rcode,
            answers: filtered.records,
            soa,
        };
        (reply, record)
    }
}

/// Whether audit mode lets a query denied for `reason` through, now. Special-use names,
/// rebinding, malformed input and rate limits are never audited (they protect dnsfence and
/// the internal network, not the policy's intent), nor are meta query types no policy could
/// allow.
fn audits(policy: &Policy, reason: DenyReason, question: &Question) -> bool {
    audits_type(policy, reason, question.qtype)
}

fn audits_type(policy: &Policy, reason: DenyReason, qtype: RecordType) -> bool {
    let auditable = match reason {
        DenyReason::Policy | DenyReason::ExfiltrationBudget => true,
        DenyReason::Qtype => !is_meta_qtype(qtype),
        _ => false,
    };
    auditable && policy.mode.audits_at(SystemTime::now())
}

fn deny(policy: &Policy, mut record: QueryRecord, reason: DenyReason) -> (Reply, QueryRecord) {
    let rcode = match policy.deny_with {
        DenyWith::NxDomain => ResponseCode::NXDomain,
        DenyWith::Refused => ResponseCode::Refused,
    };
    record.decision = "deny";
    record.reason = Some(reason.as_str());
    record.audit = false;
    record.rcode = rcode;
    (Reply::empty(rcode), record)
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
    let record = QueryRecord::new(client, transport.as_str());
    match question {
        Some(question) => record.with_question(&question.name, question.qtype),
        None => record,
    }
}

/// The addresses of the records handed out, for the log.
fn logged_addresses(records: &[Record]) -> LoggedAddresses {
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
