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
//! [`Pipeline::answer_wire`] is the shortcut for the common cases, a local denial and a cache
//! hit ([`fast`]): the same decision and the same limits (`Pipeline::gate`, shared with the
//! full path), on the message's bytes, with answers the full path encoded before.
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
pub mod fast;
pub mod grants;
pub mod limits;
pub mod local_source;
pub mod request;
pub mod upstream;

use crate::stage_times::{Span, Stage};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::sync::Semaphore;

use crate::firewall::Admitter;
use crate::policy::{CnameMode, DenyWith, Group, Mode, Policy, Rule};
use crate::querylog::{
    LoggedAddress, LoggedAddresses, PolicyTag, QueryName, QueryRecord, ShortText,
};
use address_guard::{AddressGuard, AddressVerdict};
use admitted::{AdmittedIndex, Justification};
use answer_filter::{AnswerContext, filter_answer};
use decision::{Decision, DenyReason, decide, is_special_use, is_wildcard};
use fast::{ReplyKey, ReplyProbe, WireAnswer, WireQuery};
use grants::{Grant, Grants};
use limits::{InflightShares, InflightSlot, RateLimiter, WildcardBudget};
use local_source::HostAddresses;
use request::Question;
use upstream::Upstreams;
use upstream::cache::{MAX_ENTRIES, Slru};

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
    /// Unique per generation of this process: what the reply cache files answers under.
    id: u64,
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
            id: next_generation_id(),
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
            id: next_generation_id(),
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
            id: next_generation_id(),
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

fn next_generation_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
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
    /// Encoded answers for the fast path ([`fast`]), filled by the full path.
    replies: Slru<ReplyKey, WireAnswer>,
    /// Queries the fast path answered from `replies`.
    fast_hits: AtomicU64,
}

/// What a question that passed the limits holds while it is answered.
struct Passed<'g, 'p> {
    group: &'g str,
    rule: Option<&'g Rule>,
    grant: Option<&'g Grant>,
    /// The in-flight permit and the client's slot, held to the end of a query that may wait;
    /// `None` for one answered at once ([`Slots::Check`]).
    _slots: Option<(tokio::sync::SemaphorePermit<'p>, InflightSlot<'p>)>,
}

/// What the gate does with the in-flight limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slots {
    /// Takes a permit and a slot of the client's share, held until the query ends: a query
    /// that waits on the upstream or the firewall.
    Take,
    /// Checks that both a permit and a slot are free, and takes neither: a query answered
    /// before the gate returns (the fast path), which would release them at once. It is
    /// refused exactly when `Take` would be.
    Check,
}

type Outcome = (Reply, QueryRecord);

/// Addresses of a cached answer the fast path checks without allocating.
const FEW_ADDRESSES: usize = 8;

/// What the log says of a cache hit: rcode, addresses sent, addresses refused, upstream.
type HitLog = (
    ResponseCode,
    LoggedAddresses,
    Vec<IpAddr>,
    Option<SocketAddr>,
);

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
            replies: Slru::with_capacity(MAX_ENTRIES),
            fast_hits: AtomicU64::new(0),
            current: ArcSwap::from_pointee(generation),
            upstreams,
            admitter,
            host: Arc::new(HostAddresses::read()),
        }
    }

    /// Who a connection or query from `source` counts as for per-client limits: the key its
    /// budgets are charged to (see [`limits::client_key`]) after mapping this host's own
    /// addresses to the loopback client ([`local_source`]), so that a local process binding N
    /// host addresses is still one client. For the front ends' own per-client caps.
    pub fn client_identity(&self, source: IpAddr) -> IpAddr {
        limits::client_key(self.host.client_for(source))
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
        let mut stats = self.upstreams.stats();
        stats.cache_hits += self.fast_hits.load(Ordering::Relaxed);
        stats
    }

    /// Drops the cached answers for names `keep` rejects (names a reload or a grant's end
    /// denied), so that nothing of theirs is served from memory if they are allowed again.
    pub fn forget_cached(&self, keep: impl Fn(&Name) -> bool) {
        self.upstreams.retain_cached(keep);
        // Encoded answers are filed under their generation, which a reload or a grant's end
        // replaces: none of them is served again; drop them so they do not wait for eviction.
        let current = self.current.load().id;
        self.replies.retain(|key| key.generation == current);
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

    /// The limits every query passes before it is answered, on both paths, in this order: the
    /// rate limit, the decision (`decided`, with audit mode), the exfiltration budget, the
    /// in-flight limit and the client's share of it. `Err` carries the local answer.
    // Both arms carry the query's record by value: it is written once, at the end.
    #[allow(clippy::result_large_err, clippy::too_many_arguments)]
    fn gate<'g, 'p>(
        &'p self,
        generation: &'g Generation,
        client_ip: IpAddr,
        question: &Question,
        decided: (Decision<'g>, Option<&'g Grant>),
        started: Instant,
        slots: Slots,
        mut record: QueryRecord,
    ) -> Result<(Passed<'g, 'p>, QueryRecord), Outcome> {
        let policy = generation.policy.as_ref();
        let budget_key = limits::client_key(client_ip);
        if let Some(rate) = generation.rate.as_ref()
            && !rate.allow(budget_key, started)
        {
            return Err(refuse(record, DenyReason::RateLimit));
        }

        // In audit mode a denial for `policy` or `qtype` goes on as if allowed (with no rule),
        // and the record keeps the reason it would have been denied for.
        let (decision, grant) = decided;
        let (group_name, rule) = match decision {
            Decision::Allow { group, rule } => (group, Some(rule)),
            Decision::Deny(reason) if audits(policy, reason, question) => {
                record.audit = true;
                record.reason = Some(reason.as_str());
                (policy.group_for(client_ip).name.as_str(), None)
            }
            Decision::Deny(reason) => return Err(deny(policy, record, reason)),
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
                    .charge(budget_key, &rule.pattern, &question.name, started);
            if let Err(exceeded) = charged {
                record.error = Some(exceeded.to_string());
                if !audits(policy, DenyReason::ExfiltrationBudget, question) {
                    return Err(deny(policy, record, DenyReason::ExfiltrationBudget));
                }
                record.audit = true;
                record.reason = Some(DenyReason::ExfiltrationBudget.as_str());
            }
        }
        record.decision = if record.audit { "deny" } else { "allow" };
        let share = policy.limits.max_inflight_per_client;
        let too_many = |mut record: QueryRecord, held: usize| {
            record.error = Some(format!(
                "client has {held} queries in flight (limits.max_inflight_per_client {share})"
            ));
            refuse(record, DenyReason::RateLimit)
        };
        let busy = |mut record: QueryRecord| {
            record.error = Some("too many queries in flight".to_owned());
            refuse(record, DenyReason::RateLimit)
        };
        let slots = match slots {
            Slots::Take => {
                let Ok(in_flight) = self.in_flight.try_acquire() else {
                    return Err(busy(record));
                };
                // Taken after the global permit, so the map of counts holds at most
                // max_inflight clients; released when the query ends or its future is dropped.
                match self.in_flight_per_client.try_take(budget_key, share) {
                    Ok(slot) => Some((in_flight, slot)),
                    Err(held) => return Err(too_many(record, held)),
                }
            }
            Slots::Check => {
                if self.in_flight.available_permits() == 0 {
                    return Err(busy(record));
                }
                let held = self.in_flight_per_client.count(budget_key);
                if held >= share {
                    return Err(too_many(record, held));
                }
                None
            }
        };
        let passed = Passed {
            group: group_name,
            rule,
            grant,
            _slots: slots,
        };
        Ok((passed, record))
    }

    /// The fast path ([`fast`]): answers `message` into `reply` when it is a plain query that is
    /// denied or whose answer is in the reply cache with its addresses admitted moments ago;
    /// returns its log record. `None` (and `reply` untouched) for everything else, which takes
    /// the full path. `udp_cap` is the largest UDP payload dnsfence sends.
    pub fn answer_wire(
        &self,
        message: &[u8],
        client: SocketAddr,
        transport: Transport,
        udp_cap: u16,
        reply: &mut Vec<u8>,
    ) -> Option<QueryRecord> {
        let query = fast::parse_query(message)?;
        let generation = self.current.load();
        let generation: &Generation = &generation;
        let policy = generation.policy.as_ref();
        // Audit mode decides by the clock and explains itself in the log: the full path's job.
        if !matches!(policy.mode, Mode::Enforce) {
            return None;
        }
        let question = Question {
            name: query.name()?,
            qtype: query.qtype,
        };
        // As on the full path: a query from one of this host's addresses is loopback's.
        let client_ip = self.host.client_for(client.ip());
        let started = Instant::now();
        let decided = generation.decide(client_ip, &question.name, question.qtype, started);
        let max_size = match transport {
            Transport::Udp => query.udp_limit(udp_cap),
            Transport::Tcp => u16::MAX,
        };
        let mut hit = None;
        if let (Decision::Allow { group, .. }, grant) = &decided {
            if grant.is_some() {
                return None;
            }
            hit = Some(self.cached_reply(
                generation, group, &query, client_ip, max_size, udp_cap, started, reply,
            )?);
        }
        let mut record = QueryRecord::new(client, transport.as_str());
        // The log's copy of the name straight from the datagram (the same labels as `question`).
        record.qname = QueryName::from_wire(query.wire_name())
            .unwrap_or_else(|| QueryName::of(&question.name));
        record.qtype = Some(question.qtype);
        record.policy = generation.tag;
        match self.gate(
            generation,
            client_ip,
            &question,
            decided,
            started,
            Slots::Check,
            record,
        ) {
            Ok((_passed, mut record)) => {
                // Only an allowed question passes the gate, and only with a hit.
                let Some((rcode, answers, refused, upstream)) = hit else {
                    reply.clear();
                    return None;
                };
                self.fast_hits.fetch_add(1, Ordering::Relaxed);
                record.rcode = rcode;
                record.answers = answers;
                record.refused = refused;
                record.upstream = upstream;
                Some(record)
            }
            Err((answer, record)) => {
                fast::write_empty(reply, &query, answer.rcode, udp_cap);
                Some(record)
            }
        }
    }

    /// Writes the cached answer to `query` into `reply` if there is one, it fits `max_size` and
    /// the firewall acknowledged its addresses for `client` moments ago for at least as long as
    /// its TTL asks; returns what the log says of it.
    #[allow(clippy::too_many_arguments)]
    fn cached_reply(
        &self,
        generation: &Generation,
        group: &str,
        query: &WireQuery<'_>,
        client: IpAddr,
        max_size: u16,
        udp_cap: u16,
        now: Instant,
        reply: &mut Vec<u8>,
    ) -> Option<HitLog> {
        let mut lower = [0u8; 256];
        let wire = query.wire_name();
        let lower = lower.get_mut(..wire.len())?;
        lower.copy_from_slice(wire);
        lower.make_ascii_lowercase();
        let probe = ReplyProbe {
            generation: generation.id,
            group,
            qtype: u16::from(query.qtype),
            name: lower,
        };
        let hash = self.replies.hash_of(&probe);
        let (found, address_ttl) = self.replies.get(
            hash,
            |key| probe.matches(key),
            now,
            |answer, age| {
                let edns = query.edns_payload.is_some();
                if answer.reply_len(query.question_len(), edns) > usize::from(max_size) {
                    return None;
                }
                let age = fast::age_secs(age);
                let address_ttl = answer.write(reply, query, age, udp_cap);
                let logged = answer
                    .logged
                    .iter()
                    .map(|a| LoggedAddress {
                        addr: a.addr,
                        ttl: a.ttl.saturating_sub(age),
                    })
                    .collect::<LoggedAddresses>();
                let found = (
                    answer.rcode,
                    logged,
                    answer.refused.to_vec(),
                    answer.upstream,
                );
                // Copied out (onto the stack when few) for the check after the shard's lock.
                let mut addresses = [(IpAddr::from([0, 0, 0, 0]), Duration::ZERO); FEW_ADDRESSES];
                let mut spilled = Vec::new();
                match addresses.get_mut(..answer.addresses.len()) {
                    Some(slots) => {
                        for (slot, &addr) in slots.iter_mut().zip(answer.addresses.iter()) {
                            slot.0 = addr;
                        }
                    }
                    None => {
                        spilled = answer
                            .addresses
                            .iter()
                            .map(|&a| (a, Duration::ZERO))
                            .collect()
                    }
                }
                let count = answer.addresses.len();
                Some((found, (address_ttl, addresses, spilled, count)))
            },
        )??;
        let (address_ttl, mut addresses, mut spilled, count) = address_ttl;
        if let Some(admitter) = &self.admitter
            && count > 0
        {
            let lifetime = answer_filter::admission_lifetime(address_ttl, &generation.policy.ttl);
            let wanted = match addresses.get_mut(..count) {
                Some(few) => few,
                None => spilled.as_mut_slice(),
            };
            for (_, wanted_for) in wanted.iter_mut() {
                *wanted_for = lifetime;
            }
            if !admitter.covered(client, wanted) {
                reply.clear();
                return None;
            }
        }
        Some(found)
    }

    /// Files the full path's answer for the fast path, when it depends on nothing but the
    /// generation, the group and the question.
    #[allow(clippy::too_many_arguments)]
    fn share(
        &self,
        generation: &Generation,
        group: &str,
        question: &Question,
        reply: &Reply,
        record: &QueryRecord,
        addresses: &[(IpAddr, Duration)],
        fresh_for: Duration,
    ) {
        if !generation.grants.is_empty()
            || record.audit
            || record.grant.is_some()
            || record.error.is_some()
            || !matches!(reply.rcode, ResponseCode::NoError | ResponseCode::NXDomain)
            || fresh_for.is_zero()
            // Every record takes at least 11 bytes: an answer this long is never kept, so it
            // is not encoded a second time only to be thrown away.
            || (reply.answers.len() + 1) * 11 > fast::MAX_CACHED_ANSWER
        {
            return;
        }
        let name = fast::lower_wire(&question.name);
        let Some((body, answers, authorities, ttls, address_ttl)) = WireAnswer::encode(
            &name,
            question.qtype,
            reply.rcode,
            &reply.answers,
            reply.soa.as_ref(),
        ) else {
            return;
        };
        let answer = WireAnswer {
            rcode: reply.rcode,
            answers,
            authorities,
            body,
            ttls: ttls.into(),
            address_ttl,
            addresses: addresses.iter().map(|&(addr, _)| addr).collect(),
            logged: record.answers.iter().copied().collect(),
            refused: record.refused.clone().into(),
            upstream: record.upstream,
        };
        let probe = ReplyProbe {
            generation: generation.id,
            group,
            qtype: u16::from(question.qtype),
            name: &name,
        };
        let hash = self.replies.hash_of(&probe);
        self.replies.put(
            hash,
            probe.to_key(),
            answer,
            Instant::now(),
            fresh_for.min(upstream::cache::MAX_TTL),
        );
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
        let started = Instant::now();
        let decided = generation.decide(client_ip, &question.name, question.qtype, started);
        let (passed, mut record) = match self.gate(
            generation,
            client_ip,
            question,
            decided,
            started,
            Slots::Take,
            record,
        ) {
            Ok(passed) => passed,
            Err(outcome) => return outcome,
        };
        let (group_name, rule, grant) = (passed.group, passed.rule, passed.grant);

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
        // How long the upstream cache keeps this answer: the encoded copy lives no longer.
        let fresh_for = upstream::cache::cache_ttl(&answer);

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
        let filtering = Span::start();
        let mut filtered = filter_answer(&cx, &answer.answers);
        filtering.end(Stage::Filter);
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
            let recording = Span::start();
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
            recording.end(Stage::IndexRecord);
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
        let sharing = Span::start();
        self.share(
            generation,
            group_name,
            question,
            &reply,
            &record,
            &filtered.admit,
            fresh_for,
        );
        sharing.end(Stage::Share);
        (reply, record)
    }
}

#[cfg(test)]
impl Pipeline {
    /// Holds `n` in-flight permits, each with a slot of `client`'s share, as `n` of its queries
    /// waiting on the upstream would.
    pub(crate) fn hold_in_flight(
        &self,
        client: IpAddr,
        n: usize,
    ) -> Vec<(tokio::sync::SemaphorePermit<'_>, InflightSlot<'_>)> {
        (0..n)
            .map(|_| {
                let permit = self.in_flight.try_acquire().expect("a free permit");
                let slot = self
                    .in_flight_per_client
                    .try_take(limits::client_key(client), usize::MAX)
                    .expect("a slot");
                (permit, slot)
            })
            .collect()
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

use fast::is_meta_qtype;

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
