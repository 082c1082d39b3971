//! Temporary grants: a name allowed for a while on top of the policy.
//!
//! An operator (or an orchestrator preparing the next step of an agent) grants `NAME` for, say,
//! 30 seconds through the control socket. A grant is one rule in the policy's own grammar,
//! matched by the policy's own matcher, and scoped to everyone, one client address or one
//! client group. It only ever *adds* to the policy: a name the policy denies for another reason
//! than "no rule allows it" (a special-use name, a query type the policy does not forward)
//! stays denied.
//!
//! The active grants are an immutable list inside the pipeline's current generation; adding or
//! ending one swaps in a new generation, like a reload. The decision checks the grant's expiry
//! itself, so a grant stops allowing its name at the instant it ends, before anything else
//! happens; revoking the addresses it admitted follows (see the control module).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hickory_proto::rr::Name;
use serde::Serialize;

use crate::policy::{Rule, RuleSet};

/// Who a grant applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    /// Every client.
    Everyone,
    /// One client address (IPv4-mapped IPv6 addresses count as IPv4).
    Client(IpAddr),
    /// The clients of one group of the policy (`default` for those in no group).
    Group(String),
}

/// One active grant.
#[derive(Debug)]
pub struct Grant {
    pub id: u64,
    /// The rule, canonical (`*.example.com`).
    pub rule: Rule,
    matcher: RuleSet,
    pub scope: GrantScope,
    pub reason: String,
    pub granted_at: SystemTime,
    pub expires_at: SystemTime,
    /// The same instant as `expires_at`, on the monotonic clock the pipeline uses.
    pub expires: Instant,
    /// Who asked, from the control socket's peer credentials.
    pub uid: u32,
    pub pid: i32,
}

impl Grant {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        rule: Rule,
        scope: GrantScope,
        reason: String,
        granted_at: (SystemTime, Instant),
        lasts: std::time::Duration,
        uid: u32,
        pid: i32,
    ) -> Result<Grant, String> {
        let matcher = RuleSet::new(vec![rule.clone()]).map_err(|error| error.to_string())?;
        let scope = match scope {
            GrantScope::Client(ip) => GrantScope::Client(ip.to_canonical()),
            other => other,
        };
        Ok(Grant {
            id,
            rule,
            matcher,
            scope,
            reason,
            granted_at: granted_at.0,
            expires_at: granted_at.0 + lasts,
            expires: granted_at.1 + lasts,
            uid,
            pid,
        })
    }

    /// The grant's id as users see it.
    pub fn label(&self) -> String {
        grant_label(self.id)
    }

    pub fn is_live(&self, now: Instant) -> bool {
        now < self.expires
    }

    fn applies_to(&self, client: IpAddr, group: &str) -> bool {
        match &self.scope {
            GrantScope::Everyone => true,
            GrantScope::Client(ip) => *ip == client.to_canonical(),
            GrantScope::Group(name) => name == group,
        }
    }
}

/// `g<id>`: what `ctl grant` prints and `ctl revoke` takes.
pub fn grant_label(id: u64) -> String {
    format!("g{id}")
}

/// Parses `g12` (or `12`) back to an id.
pub fn parse_grant_label(text: &str) -> Option<u64> {
    text.strip_prefix('g').unwrap_or(text).parse().ok()
}

/// The active grants, oldest first. Immutable: changes build a new list.
#[derive(Debug, Default, Clone)]
pub struct Grants {
    active: Vec<Arc<Grant>>,
}

impl Grants {
    /// The live grant that allows `name` for `client` (in `group`), with its rule.
    pub fn find(
        &self,
        client: IpAddr,
        group: &str,
        name: &Name,
        now: Instant,
    ) -> Option<(&Grant, &Rule)> {
        self.active
            .iter()
            .filter(|g| g.is_live(now) && g.applies_to(client, group))
            .find_map(|g| g.matcher.find(name).map(|rule| (g.as_ref(), rule)))
    }

    /// Whether a live grant, for anyone, allows `name`.
    pub fn allows_anyone(&self, name: &Name, now: Instant) -> bool {
        self.active
            .iter()
            .any(|g| g.is_live(now) && g.matcher.find(name).is_some())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Grant>> {
        self.active.iter()
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub fn get(&self, id: u64) -> Option<&Arc<Grant>> {
        self.active.iter().find(|g| g.id == id)
    }

    /// A list with `grant` added.
    pub fn with(&self, grant: Grant) -> Grants {
        let mut active = self.active.clone();
        active.push(Arc::new(grant));
        Grants { active }
    }

    /// A list without the grants `remove` selects, and those removed.
    pub fn without(&self, remove: impl Fn(&Grant) -> bool) -> (Grants, Vec<Arc<Grant>>) {
        let (gone, kept): (Vec<_>, Vec<_>) = self.active.iter().cloned().partition(|g| remove(g));
        (Grants { active: kept }, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn grant(id: u64, rule: &str, scope: GrantScope, lasts: u64, now: Instant) -> Grant {
        let rule = Rule::parse(rule, 0).unwrap();
        Grant::new(
            id,
            rule,
            scope,
            "test".into(),
            (SystemTime::now(), now),
            Duration::from_secs(lasts),
            0,
            1,
        )
        .unwrap()
    }

    #[test]
    fn a_grant_allows_its_name_for_its_scope_until_it_ends() {
        let now = Instant::now();
        let grants = Grants::default()
            .with(grant(1, "*.example.com", GrantScope::Everyone, 2, now))
            .with(grant(
                2,
                "pypi.org",
                GrantScope::Client("10.0.0.7".parse().unwrap()),
                60,
                now,
            ))
            .with(grant(
                3,
                "crates.io",
                GrantScope::Group("builders".into()),
                60,
                now,
            ));
        let name = |n: &str| Name::from_ascii(n).unwrap();
        let a: IpAddr = "10.0.0.7".parse().unwrap();
        let b: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(
            grants
                .find(b, "default", &name("x.example.com."), now)
                .is_some()
        );
        assert!(
            grants
                .find(b, "default", &name("example.com."), now)
                .is_none()
        );
        let later = now + Duration::from_secs(2);
        assert!(
            grants
                .find(b, "default", &name("x.example.com."), later)
                .is_none(),
            "ended"
        );
        assert!(grants.find(a, "default", &name("pypi.org."), now).is_some());
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert!(
            grants
                .find(mapped, "default", &name("pypi.org."), now)
                .is_some()
        );
        assert!(grants.find(b, "default", &name("pypi.org."), now).is_none());
        assert!(
            grants
                .find(b, "builders", &name("crates.io."), now)
                .is_some()
        );
        assert!(
            grants
                .find(b, "default", &name("crates.io."), now)
                .is_none()
        );
        let (rest, gone) = grants.without(|g| g.id == 2);
        assert_eq!(gone.len(), 1);
        assert_eq!(rest.len(), 2);
        assert_eq!(parse_grant_label(&gone[0].label()), Some(2));
    }
}
