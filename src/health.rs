//! Readiness: one shared answer to "may traffic be sent to this dnsfence yet?".
//!
//! dnsfence is ready once three things are true, in the order `serve` makes them true:
//! 1. the policy is loaded and valid;
//! 2. the firewall ruleset is installed and was read back from the kernel (or the policy turned
//!    the firewall off, which the start-up line warns about);
//! 3. every listening socket is bound.
//!
//! Before that, an agent started against this resolver could be answered by nothing, or (worse)
//! be answered while the default-drop ruleset is not there yet. The control socket's
//! `GET /v1/ready` (`dnsfence ctl ready`), the metrics endpoint's `/readyz` and systemd's
//! `READY=1` all read the same [`Readiness`] handle, so they can never disagree. Shutting down
//! takes readiness away first, so orchestrators stop routing to a dnsfence that is leaving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use serde::Serialize;
use tokio::sync::Notify;

// 0 (the default): pending.
const FIREWALL_INSTALLED: u8 = 1;
const FIREWALL_DISABLED: u8 = 2;

/// A cheap, clonable handle on the server's readiness.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    policy_loaded: AtomicBool,
    firewall: AtomicU8,
    listeners_bound: AtomicBool,
    stopping: AtomicBool,
    changed: Notify,
}

/// A snapshot of the readiness facts, as `GET /v1/ready` returns it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadinessReport {
    pub ready: bool,
    pub policy_loaded: bool,
    /// `installed`, `pending` or `disabled` (the policy says `firewall.enabled: false`).
    pub firewall: &'static str,
    pub listeners_bound: bool,
    pub stopping: bool,
    /// What is still missing, in words, when not ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<&'static str>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// The policy was read and validated.
    pub fn set_policy_loaded(&self) {
        self.inner.policy_loaded.store(true, Ordering::Release);
        self.inner.changed.notify_waiters();
    }

    /// The ruleset is in the kernel and was read back.
    pub fn set_firewall_installed(&self) {
        self.inner
            .firewall
            .store(FIREWALL_INSTALLED, Ordering::Release);
        self.inner.changed.notify_waiters();
    }

    /// The policy turned the firewall off: nothing to wait for.
    pub fn set_firewall_disabled(&self) {
        self.inner
            .firewall
            .store(FIREWALL_DISABLED, Ordering::Release);
        self.inner.changed.notify_waiters();
    }

    /// Every DNS listening socket is bound.
    pub fn set_listeners_bound(&self) {
        self.inner.listeners_bound.store(true, Ordering::Release);
        self.inner.changed.notify_waiters();
    }

    /// dnsfence is shutting down: not ready any more, for good.
    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.changed.notify_waiters();
    }

    pub fn is_ready(&self) -> bool {
        self.report().ready
    }

    pub fn report(&self) -> ReadinessReport {
        let policy_loaded = self.inner.policy_loaded.load(Ordering::Acquire);
        let firewall = match self.inner.firewall.load(Ordering::Acquire) {
            FIREWALL_INSTALLED => "installed",
            FIREWALL_DISABLED => "disabled",
            _ => "pending",
        };
        let listeners_bound = self.inner.listeners_bound.load(Ordering::Acquire);
        let stopping = self.inner.stopping.load(Ordering::Acquire);
        let mut waiting_for = Vec::new();
        if !policy_loaded {
            waiting_for.push("the policy to load");
        }
        if firewall == "pending" {
            waiting_for.push("the firewall ruleset to be installed and read back");
        }
        if !listeners_bound {
            waiting_for.push("the DNS listeners to be bound");
        }
        if stopping {
            waiting_for.push("nothing: dnsfence is shutting down");
        }
        ReadinessReport {
            ready: waiting_for.is_empty(),
            policy_loaded,
            firewall,
            listeners_bound,
            stopping,
            waiting_for,
        }
    }

    /// Completes once dnsfence is ready (at once if it already is), for `READY=1`-style
    /// notifications.
    pub async fn wait_ready(&self) {
        loop {
            let changed = self.inner.changed.notified();
            if self.is_ready() {
                return;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_all_three_facts_hold_and_not_while_stopping() {
        let r = Readiness::new();
        assert!(!r.is_ready());
        r.set_policy_loaded();
        r.set_listeners_bound();
        assert_eq!(
            r.report().waiting_for,
            vec!["the firewall ruleset to be installed and read back"]
        );
        r.set_firewall_installed();
        assert!(r.is_ready());
        r.set_stopping();
        assert!(!r.is_ready());
    }

    #[tokio::test]
    async fn waiting_ends_when_the_last_fact_arrives() {
        let r = Readiness::new();
        r.set_policy_loaded();
        r.set_firewall_disabled();
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        tokio::task::yield_now().await;
        r.set_listeners_bound();
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
