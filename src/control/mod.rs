//! Changing the policy while dnsfence runs: reload, revocation, temporary grants, and the
//! control socket they are reached through.
//!
//! ```text
//!  SIGHUP ──┐                         ┌─► Pipeline::replace (new generation for new queries)
//!  --watch ─┼─► Control::reload ──────┤   wait for the old generation's last query
//!  ctl ─────┘   (check, restart-only) └─► revoke: judge the admitted index, delete elements,
//!  ctl grant / revoke, expiry ─► Control::{grant, end_grants} ─┘   cut their connections
//! ```
//!
//! [`Control`] is the one place that changes what agents may reach while dnsfence runs. All its
//! changes are serialized (one at a time) and follow the same steps:
//!
//! 1. build the next [`Generation`] (a reloaded policy, or the same policy with other grants);
//!    if a reload changed the firewall's shape, first replace the ruleset in one transaction
//!    that carries over the elements the next generation still justifies
//!    ([`crate::firewall::Admitter::replace`]; refused: nothing of the reload applies); then
//!    swap the generation in: queries that start from now on are decided by it;
//! 2. wait until the last query that started under the previous generation has finished (it
//!    may still admit addresses under the old policy, bounded by the upstream timeout);
//! 3. judge every justification in the admitted index again with the new generation's own
//!    decision code, delete from the kernel, in one transaction, the elements that lost all of
//!    theirs, and, depending on the policy, cut the connections to them (`conntrack`);
//! 4. write one event line to the query log.
//!
//! The control socket ([`socket`]) and `dnsfence ctl` ([`client`]) speak HTTP/1.1 + JSON over a
//! Unix socket; this module knows nothing of sockets, it only serves requests.

pub mod client;
pub mod http;
pub mod socket;
pub mod source;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::firewall::Carry;
use crate::health::Readiness;
use crate::pipeline::grants::{Grant, GrantScope, grant_label};
use crate::pipeline::{Generation, Pipeline};
use crate::policy::{ConnectionsOnRevoke, Policy, Rule, RuleKind};
use crate::querylog::{EventRecord, QueryLog};
use source::{PolicySource, restart_only_changes, ruleset_changed};

/// Who asked, from the control socket's `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// What triggered a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Watch,
    Control(Peer),
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::Watch => "watch",
            Trigger::Control(_) => "ctl",
        }
    }
}

/// A request the control service refused or failed: an HTTP status and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
    /// For an invalid policy: every error as `FILE:LINE:COLUMN: message`.
    pub errors: Vec<String>,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            errors: Vec::new(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut body = json!({ "error": self.message });
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        body
    }
}

/// What a revocation pass did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RevocationCount {
    /// Addresses (or client-address pairs, with per-client sets) deleted from the kernel.
    pub elements: usize,
    /// Connections cut.
    pub connections: usize,
}

/// A grant as the socket shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GrantView {
    pub id: String,
    pub name: String,
    pub scope: GrantScope,
    pub reason: String,
    #[serde(serialize_with = "rfc3339")]
    pub granted_at: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub expires_at: SystemTime,
    /// Seconds left (0 once ended).
    pub expires_in_s: f64,
    pub uid: u32,
    pub pid: i32,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

impl GrantView {
    fn of(grant: &Grant, now: Instant) -> GrantView {
        GrantView {
            id: grant.label(),
            name: grant.rule.pattern.clone(),
            scope: grant.scope.clone(),
            reason: grant.reason.clone(),
            granted_at: grant.granted_at,
            expires_at: grant.expires_at,
            expires_in_s: grant.expires.saturating_duration_since(now).as_secs_f64(),
            uid: grant.uid,
            pid: grant.pid,
        }
    }
}

/// `POST /v1/grants`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub name: String,
    /// A duration such as `30s` or `5m`.
    pub ttl: String,
    #[serde(default)]
    pub client: Option<IpAddr>,
    #[serde(default)]
    pub group: Option<String>,
    pub reason: String,
    #[serde(default)]
    pub force: bool,
}

/// Longest grant reason, in characters.
const MAX_REASON: usize = 512;

/// The control service. One per server.
pub struct Control {
    pipeline: Arc<Pipeline>,
    readiness: Readiness,
    log: QueryLog,
    source: PolicySource,
    started: SystemTime,
    /// One change at a time; held across the drain wait and the kernel round trips (never on
    /// the query path).
    changes: tokio::sync::Mutex<()>,
    next_grant: AtomicU64,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
    /// Elements deleted from the kernel, per [`REVOKE_CAUSES`].
    revoked: [AtomicU64; 3],
}

/// Why elements were revoked: a reload, a grant that ran out, a grant ended by hand.
pub const REVOKE_CAUSES: [&str; 3] = ["reload", "grant-expired", "grant-revoked"];

/// The control service's counters, for the metrics endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ControlStats {
    pub reloads_ok: u64,
    pub reloads_invalid: u64,
    /// Per [`REVOKE_CAUSES`].
    pub revoked: [u64; 3],
    pub grants_active: usize,
}

impl Control {
    pub fn new(
        pipeline: Arc<Pipeline>,
        readiness: Readiness,
        log: QueryLog,
        source: PolicySource,
    ) -> Control {
        Control {
            pipeline,
            readiness,
            log,
            source,
            started: SystemTime::now(),
            changes: tokio::sync::Mutex::new(()),
            next_grant: AtomicU64::new(1),
            reloads: AtomicU64::new(0),
            failed_reloads: AtomicU64::new(0),
            revoked: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Reloads, revocations and live grants so far.
    pub fn stats(&self) -> ControlStats {
        let now = Instant::now();
        ControlStats {
            reloads_ok: self.reloads.load(Ordering::Relaxed),
            reloads_invalid: self.failed_reloads.load(Ordering::Relaxed),
            revoked: self.revoked.each_ref().map(|c| c.load(Ordering::Relaxed)),
            grants_active: self
                .pipeline
                .generation()
                .grants
                .iter()
                .filter(|g| g.is_live(now))
                .count(),
        }
    }

    /// The pipeline this service changes (the admission history lives there).
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The policy new queries are decided by.
    pub fn policy(&self) -> Arc<Policy> {
        self.pipeline.policy()
    }

    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let generation = self.pipeline.generation();
        let now = Instant::now();
        let grants: Vec<GrantView> = generation
            .grants
            .iter()
            .filter(|g| g.is_live(now))
            .map(|g| GrantView::of(g, now))
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started_at": humantime::format_rfc3339_seconds(self.started).to_string(),
            "policy": {
                "file": self.source.path.display().to_string(),
                "sha256": generation.digest.as_ref(),
                "tag": generation.tag.as_str(),
                "groups": generation.policy.groups().count(),
                "rules": generation.policy.groups().map(|g| g.rules.len()).sum::<usize>(),
                // firewall.bind: the bridge ports whose agents' addresses can be trusted.
                "bound_ports": generation
                    .policy
                    .firewall
                    .bind
                    .iter()
                    .map(|b| b.port.as_str())
                    .collect::<Vec<_>>(),
            },
            "ready": self.readiness.report(),
            "reloads": {
                "ok": self.reloads.load(Ordering::Relaxed),
                "failed": self.failed_reloads.load(Ordering::Relaxed),
            },
            "admitted_addresses": self.pipeline.admitted().len(),
            "grants": grants,
        })
    }

    /// Reloads the policy file: validated like `check`, refused whole if a restart-only key
    /// changed, else swapped in and what it no longer allows revoked. The one reload of every
    /// trigger: each tells the service manager `RELOADING=1`, then `READY=1` whatever the
    /// outcome (a refused reload leaves the previous policy serving).
    pub async fn reload(&self, trigger: Trigger) -> Result<serde_json::Value, Refusal> {
        let _one_at_a_time = self.changes.lock().await;
        crate::service_manager::reloading();
        let result = self.reload_now(trigger).await;
        crate::service_manager::reloaded();
        result
    }

    async fn reload_now(&self, trigger: Trigger) -> Result<serde_json::Value, Refusal> {
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || source.load())
            .await
            .map_err(|_| Refusal::new(500, "the policy reader stopped"))?;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(invalid) => {
                let errors: Vec<String> = invalid
                    .error
                    .errors
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                return Err(self.reload_failed(
                    trigger,
                    invalid.digest.as_deref(),
                    errors,
                    "the new policy is invalid; the previous one keeps serving",
                ));
            }
        };
        let current = self.pipeline.generation();
        let refused = restart_only_changes(&current.policy, &loaded.policy);
        if !refused.is_empty() {
            return Err(self.reload_failed(
                trigger,
                Some(&loaded.digest),
                refused,
                "the new policy changes keys that need a restart; the previous one keeps serving",
            ));
        }
        for warning in &loaded.policy.warnings {
            tracing::warn!("{warning}");
        }
        let changed = loaded.digest != current.digest.as_ref();
        let reshape = ruleset_changed(&current.policy, &loaded.policy);
        let previous_cidrs = current.policy.firewall.allow_cidrs.clone();
        let next = current.reloaded(Arc::new(loaded.policy), &loaded.digest);
        drop(current);
        // The ruleset first, while the previous policy still decides queries: if the kernel
        // refuses the new one, nothing of this reload has been applied. What old-policy queries
        // admit meanwhile lands in the new sets and is judged by the revocation pass below.
        let ruleset = match (reshape, self.pipeline.admitter()) {
            (true, Some(admitter)) => {
                let now = Instant::now();
                let justified = self
                    .pipeline
                    .admitted()
                    .still_justified(now, |addr, why| next.still_justifies(addr, why, now));
                let cut_ranges = if next.policy.revoke.connections == ConnectionsOnRevoke::Cut {
                    let now_allowed = &next.policy.firewall.allow_cidrs;
                    previous_cidrs
                        .into_iter()
                        .filter(|r| !now_allowed.contains(r))
                        .collect()
                } else {
                    Vec::new()
                };
                match admitter
                    .replace(next.policy.clone(), Carry::Justified(justified), cut_ranges)
                    .await
                {
                    Ok(replaced) => Some(replaced),
                    Err(error) => {
                        return Err(self.reload_failed(
                            trigger,
                            Some(&loaded.digest),
                            vec![format!("firewall: {error}")],
                            "the new ruleset could not be installed; the previous policy and \
                             ruleset keep serving",
                        ));
                    }
                }
            }
            _ => None,
        };
        let previous = self.pipeline.replace(next);
        self.drain(previous).await;
        let cut = self.pipeline.policy().revoke.connections == ConnectionsOnRevoke::Cut;
        let revoked = self.revoke_unjustified(cut, 0).await;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            policy = %loaded.digest,
            trigger = trigger.as_str(),
            changed,
            ruleset_replaced = ruleset.as_ref().is_some_and(|r| r.changed),
            revoked = revoked.as_ref().map_or(0, |r| r.elements),
            "policy reloaded"
        );
        let mut event = EventRecord::new("reload")
            .with("policy", &loaded.digest)
            .with("result", "ok")
            .with("trigger", trigger.as_str())
            .with("changed", changed);
        if let Trigger::Control(peer) = trigger {
            event = event.with("uid", peer.uid).with("pid", peer.pid);
        }
        if let Some(replaced) = ruleset.as_ref().filter(|r| r.changed) {
            event = event.with(
                "ruleset",
                json!({
                    "replaced": true,
                    "carried": replaced.carried,
                    "dropped": replaced.dropped,
                    "hooks": replaced.drop_hooks, "connections_cut": replaced.connections, "cut_error": replaced.cut_error,
                }),
            );
        }
        event = match &revoked {
            Ok(count) => event.with("revoked", count),
            Err(error) => event.with("revoke_error", error),
        };
        self.log.event(event);
        let mut body = json!({
            "result": "ok",
            "policy": loaded.digest,
            "changed": changed,
        });
        if let Some(replaced) = &ruleset {
            body["ruleset"] = json!({
                "replaced": replaced.changed,
                "carried": replaced.carried,
                "dropped": replaced.dropped,
                "hooks": replaced.drop_hooks, "connections_cut": replaced.connections, "cut_error": replaced.cut_error,
            });
        }
        match revoked {
            Ok(count) => body["revoked"] = json!(count),
            Err(error) => body["revoke_error"] = json!(error),
        }
        Ok(body)
    }

    fn reload_failed(
        &self,
        trigger: Trigger,
        digest: Option<&str>,
        errors: Vec<String>,
        message: &str,
    ) -> Refusal {
        self.failed_reloads.fetch_add(1, Ordering::Relaxed);
        for error in &errors {
            tracing::error!(trigger = trigger.as_str(), "reload refused: {error}");
        }
        let mut event = EventRecord::new("reload")
            .with("policy", digest)
            .with("result", "invalid")
            .with("trigger", trigger.as_str())
            .with("errors", &errors);
        if let Trigger::Control(peer) = trigger {
            event = event.with("uid", peer.uid).with("pid", peer.pid);
        }
        self.log.event(event);
        Refusal {
            status: 422,
            message: message.to_owned(),
            errors,
        }
    }

    /// Waits until no query runs under `previous` any more, at most the upstream timeout plus
    /// a second (a query never takes longer).
    async fn drain(&self, previous: Arc<Generation>) {
        let limit = previous.policy.upstream_timeout + Duration::from_secs(1);
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(1);
        while Arc::strong_count(&previous) > 1 && Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Judges every admitted address again under the current generation, deletes those left
    /// without justification and, with `cut`, their connections; drops cached answers for names
    /// nothing allows any more.
    /// `cause` indexes [`REVOKE_CAUSES`].
    async fn revoke_unjustified(&self, cut: bool, cause: usize) -> Result<RevocationCount, String> {
        let generation = self.pipeline.generation();
        let now = Instant::now();
        let lost = self
            .pipeline
            .admitted()
            .revoke_unjustified(now, |addr, why| generation.still_justifies(addr, why, now));
        self.pipeline.forget_cached(|name| {
            generation
                .policy
                .groups()
                .any(|g| g.rules.find(name).is_some())
                || generation.grants.allows_anyone(name, now)
        });
        let Some(admitter) = self.pipeline.admitter() else {
            return Ok(RevocationCount::default());
        };
        let per_client = admitter.per_client();
        let targets: Vec<(Option<IpAddr>, IpAddr)> = lost
            .iter()
            .flat_map(|l| {
                let pairs: Vec<(Option<IpAddr>, IpAddr)> = if per_client {
                    l.clients.iter().map(|c| (Some(*c), l.addr)).collect()
                } else if l.all {
                    vec![(None, l.addr)]
                } else {
                    Vec::new()
                };
                pairs
            })
            .collect();
        if targets.is_empty() {
            return Ok(RevocationCount::default());
        }
        let addresses: Vec<String> = targets.iter().map(|(_, a)| a.to_string()).collect();
        match admitter.revoke(targets, cut).await {
            Ok(revoked) => {
                if let Some(error) = &revoked.cut_error {
                    tracing::error!(%error, "revoked addresses, but could not cut their connections");
                }
                let count = RevocationCount {
                    elements: revoked.elements,
                    connections: revoked.connections,
                };
                if let Some(counter) = self.revoked.get(cause) {
                    counter.fetch_add(revoked.elements as u64, Ordering::Relaxed);
                }
                self.log.event(
                    EventRecord::new("revoke")
                        .with("addresses", &addresses)
                        .with("connections_cut", revoked.connections)
                        .with("cut", cut)
                        .with("cut_error", revoked.cut_error),
                );
                Ok(count)
            }
            Err(error) => {
                tracing::error!(%error, "cannot revoke addresses the policy no longer allows; they expire on their own");
                Err(format!("cannot delete revoked elements: {error}"))
            }
        }
    }

    /// `GET /v1/why/IP[/CLIENT]`: what the running server knows of `ip` (which names
    /// resolved to it, for whom, until when, what was revoked), and how a dropped packet from
    /// `client` to it would be explained (the same judgement as the drop lines).
    pub fn why(&self, ip: IpAddr, client: Option<IpAddr>) -> serde_json::Value {
        let ip = ip.to_canonical();
        let now = Instant::now();
        let history = self.pipeline.admitted().history(ip);
        let per_client = self.pipeline.admitter().is_some_and(|a| a.per_client());
        let client = client.map(|c| c.to_canonical());
        let verdict = crate::explain::judge(
            &history,
            client.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            None,
            per_client && client.is_some(),
            now,
        );
        let time = |at: Instant| {
            humantime::format_rfc3339_seconds(crate::explain::wall_clock(at, now)).to_string()
        };
        let admissions: Vec<serde_json::Value> = history
            .justifications_of(client)
            .map(|j| {
                json!({
                    "name": j.bare_name(),
                    "client": j.client,
                    "qtype": j.qtype.to_string(),
                    "group": j.group.as_ref(),
                    "rule": j.rule.as_ref(),
                    "grant": j.grant.map(grant_label),
                    "until": time(j.until),
                    "live": j.until > now,
                })
            })
            .collect();
        let revoked: Vec<serde_json::Value> = history
            .revoked_of(client)
            .map(|r| {
                json!({
                    "name": r.why.bare_name(),
                    "client": r.why.client,
                    "revoked_at": time(r.at),
                })
            })
            .collect();
        json!({
            "ip": ip,
            "client": client,
            "admitted": verdict.explanation.is_none(),
            "explanation": verdict.explanation.map(crate::explain::Explanation::as_str),
            "names": verdict.names,
            "admissions": admissions,
            "revoked": revoked,
        })
    }

    /// `GET /v1/grants`.
    pub fn grants(&self) -> Vec<GrantView> {
        let now = Instant::now();
        self.pipeline
            .generation()
            .grants
            .iter()
            .filter(|g| g.is_live(now))
            .map(|g| GrantView::of(g, now))
            .collect()
    }

    /// `POST /v1/grants`.
    pub async fn grant(&self, request: GrantRequest, peer: Peer) -> Result<GrantView, Refusal> {
        let _one_at_a_time = self.changes.lock().await;
        let current = self.pipeline.generation();
        let policy = &current.policy;
        let limits = policy.grants;
        let rule = Rule::parse(request.name.trim(), 0)
            .map_err(|e| Refusal::new(400, format!("grant name {:?}: {e}", request.name)))?;
        if let Some(why) = needs_force(&rule)
            && !request.force
        {
            return Err(Refusal::new(
                400,
                format!("{why}; add --force (\"force\": true) if that is what you mean"),
            ));
        }
        let ttl = humantime::parse_duration(request.ttl.trim()).map_err(|e| {
            Refusal::new(
                400,
                format!(
                    "ttl {:?}: {e}; write a duration such as 30s or 5m",
                    request.ttl
                ),
            )
        })?;
        if ttl.is_zero() || ttl > limits.max_ttl {
            return Err(Refusal::new(
                400,
                format!(
                    "ttl {} is outside 1ms..={} (grants.max_ttl)",
                    humantime::format_duration(ttl),
                    humantime::format_duration(limits.max_ttl)
                ),
            ));
        }
        let reason = request.reason.trim();
        if reason.is_empty() {
            return Err(Refusal::new(
                400,
                "a grant needs a reason (--reason TEXT): it goes to the query log",
            ));
        }
        if reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(Refusal::new(
                400,
                format!("the reason must be one line of at most {MAX_REASON} characters"),
            ));
        }
        let scope = match (request.client, request.group) {
            (Some(_), Some(_)) => {
                return Err(Refusal::new(
                    400,
                    "a grant is for one client or one group, not both",
                ));
            }
            (Some(ip), None) => GrantScope::Client(ip),
            (None, Some(group)) => {
                if !policy.groups().any(|g| g.name == group) {
                    let names: Vec<&str> = policy.groups().map(|g| g.name.as_str()).collect();
                    return Err(Refusal::new(
                        400,
                        format!(
                            "no client group is named {group:?}; the policy has {}",
                            names.join(", ")
                        ),
                    ));
                }
                GrantScope::Group(group)
            }
            (None, None) => GrantScope::Everyone,
        };
        let now = Instant::now();
        let live = current.grants.iter().filter(|g| g.is_live(now)).count();
        if live >= limits.max_active {
            return Err(Refusal::new(
                429,
                format!(
                    "{live} grants are active (grants.max_active); revoke one or wait for one to end"
                ),
            ));
        }
        let id = self.next_grant.fetch_add(1, Ordering::Relaxed);
        let grant = Grant::new(
            id,
            rule,
            scope,
            reason.to_owned(),
            (SystemTime::now(), now),
            ttl,
            peer.uid,
            peer.pid.unwrap_or(0),
        )
        .map_err(|e| Refusal::new(400, e))?;
        let view = GrantView::of(&grant, now);
        let (kept, _) = current.grants.without(|g| !g.is_live(now));
        let next = current.with_grants(kept.with(grant));
        drop(current);
        self.pipeline.replace(next);
        tracing::info!(grant = %view.id, name = %view.name, uid = peer.uid, "grant added");
        self.log.event(
            EventRecord::new("grant")
                .with("id", &view.id)
                .with("name", &view.name)
                .with("scope", &view.scope)
                .with("ttl_s", ttl.as_secs_f64())
                .with(
                    "expires_at",
                    humantime::format_rfc3339_millis(view.expires_at).to_string(),
                )
                .with("reason", &view.reason)
                .with("uid", peer.uid)
                .with("pid", peer.pid),
        );
        Ok(view)
    }

    /// `DELETE /v1/grants/{id}`: ends a grant now.
    pub async fn revoke_grant(&self, id: u64, peer: Peer) -> Result<serde_json::Value, Refusal> {
        let cut = self.pipeline.policy().revoke.connections == ConnectionsOnRevoke::Cut;
        let ended = self
            .end_grants(|g| g.id == id, "revoked", Some(peer), cut)
            .await;
        match ended {
            Some((views, revoked)) if !views.is_empty() => Ok(json!({
                "ended": views,
                "revoked": revoked,
            })),
            _ => Err(Refusal::new(
                404,
                format!(
                    "no active grant {}; list them with `dnsfence ctl grants`",
                    grant_label(id)
                ),
            )),
        }
    }

    /// Ends the grants whose time is up.
    pub async fn expire_grants(&self) {
        let now = Instant::now();
        if self
            .pipeline
            .generation()
            .grants
            .iter()
            .all(|g| g.is_live(now))
        {
            return;
        }
        let cut = self.pipeline.policy().grants.on_expiry == ConnectionsOnRevoke::Cut;
        self.end_grants(|g| !g.is_live(now), "expired", None, cut)
            .await;
    }

    /// Removes the grants `end` selects, then revokes what only they justified.
    async fn end_grants(
        &self,
        end: impl Fn(&Grant) -> bool,
        cause: &'static str,
        peer: Option<Peer>,
        cut: bool,
    ) -> Option<(Vec<GrantView>, Option<RevocationCount>)> {
        let _one_at_a_time = self.changes.lock().await;
        let current = self.pipeline.generation();
        let (kept, gone) = current.grants.without(end);
        if gone.is_empty() {
            return None;
        }
        let next = current.with_grants(kept);
        drop(current);
        let previous = self.pipeline.replace(next);
        self.drain(previous).await;
        let cause_index = if cause == "expired" { 1 } else { 2 };
        let revoked = self.revoke_unjustified(cut, cause_index).await;
        let now = Instant::now();
        let views: Vec<GrantView> = gone.iter().map(|g| GrantView::of(g, now)).collect();
        for view in &views {
            tracing::info!(grant = %view.id, name = %view.name, cause, "grant ended");
            let mut event = EventRecord::new("grant-end")
                .with("id", &view.id)
                .with("name", &view.name)
                .with("cause", cause)
                .with("cut", cut);
            // The grant's own requester for an expiry; whoever revoked it otherwise.
            let (uid, pid) = match peer {
                Some(peer) => (peer.uid, peer.pid),
                None => (view.uid, Some(view.pid)),
            };
            event = event.with("uid", uid).with("pid", pid);
            event = match &revoked {
                Ok(count) => event.with("revoked", count),
                Err(error) => event.with("revoke_error", error),
            };
            self.log.event(event);
        }
        Some((views, revoked.ok()))
    }

    /// Ends grants as they expire, until `stop` completes.
    pub async fn run_expiry(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => self.expire_grants().await,
            }
        }
    }

    /// Reloads whenever the file's content changes (`serve --watch`), until `stop` completes.
    pub async fn run_watch(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut seen = self.pipeline.generation().digest.to_string();
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(source::WATCH_INTERVAL) => {}
            }
            let source = self.source.clone();
            let Ok(Some(now)) = tokio::task::spawn_blocking(move || source.current_digest()).await
            else {
                continue;
            };
            if now == seen {
                continue;
            }
            seen = now;
            // Errors are logged and in the query log; the watcher keeps watching.
            let _ = self.reload(Trigger::Watch).await;
        }
    }
}

/// Why a grant's rule needs `--force`, if it does: the same lint as the policy.
fn needs_force(rule: &Rule) -> Option<String> {
    let tenant = rule.multi_tenant_suffix();
    if let Some(tenant) = tenant {
        return Some(format!(
            "{} opens the multi-tenant suffix {tenant}, where anyone can register a name and \
             receive the queries (an exfiltration channel)",
            rule.pattern
        ));
    }
    if rule.kind == RuleKind::AnyDepth {
        return Some(format!(
            "{} allows names of any depth, which lets the agent choose labels freely",
            rule.pattern
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_grants_need_force() {
        let rule = |t: &str| Rule::parse(t, 0).unwrap();
        assert!(needs_force(&rule("pypi.org")).is_none());
        assert!(needs_force(&rule("*.pythonhosted.org")).is_none());
        assert!(needs_force(&rule("**.example.com")).is_some());
        assert!(needs_force(&rule("*.github.io")).is_some());
        assert!(needs_force(&rule("*.x.herokuapp.com")).is_some());
        // From the compiled Public Suffix List's private section, not the curated list.
        assert!(needs_force(&rule("*.duckdns.org")).is_some());
        // ICANN suffixes are not forced: they do not parse.
        assert!(Rule::parse("*.co.uk", 0).is_err());
    }
}
