//! Telling a service manager (systemd's `Type=notify`) what dnsfence is doing.
//!
//! systemd starts the units ordered after dnsfence (`nss-lookup.target`, the agents' units)
//! only once dnsfence says `READY=1`. Said too early, an agent could start while the
//! default-drop table is not in the kernel yet. So `READY=1` waits on the shared
//! [`Readiness`] (ruleset installed and read back, every listener bound);
//! `STOPPING=1` goes out when the stop signal arrives, `RELOADING=1` and `READY=1` bracket a
//! reload, and when the unit sets `WatchdogSec=`, [`run_watchdog`] sends `WATCHDOG=1` at half
//! that interval from the async runtime, so a wedged runtime gets the service restarted.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd) every call here does
//! nothing. A failure to notify is logged, never fatal: the service manager then acts on its
//! own timeouts.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::health::Readiness;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// Sends `READY=1` once `readiness` says so: the same fact `dnsfence ctl ready` and `/readyz`
/// report (policy loaded, ruleset installed and read back, every listener bound).
pub async fn announce_ready(readiness: Readiness) {
    readiness.wait_ready().await;
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Wraps the server's shutdown future: when the stop signal arrives, `STOPPING=1` goes out
/// before the server starts draining.
pub async fn stopping_after(shutdown: impl Future<Output = ()>) {
    shutdown.await;
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (systemd's `Type=notify-reload` refuses a reload
/// notification without the monotonic time it began): a reload has begun, whatever triggered
/// it (SIGHUP, `dnsfence ctl reload`, `serve --watch`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the policy"),
        ]),
        Err(error) => {
            tracing::warn!(%error, "cannot read the monotonic clock for MONOTONIC_USEC");
            notify(&[
                NotifyState::Reloading,
                NotifyState::Status("reloading the policy"),
            ]);
        }
    }
}

/// `READY=1` again once a reload is over, whatever its outcome (an invalid policy leaves the
/// old one serving).
pub fn reloaded() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Half the watchdog timeout the service manager set (`WatchdogSec=`), if any: how often to
/// send `WATCHDOG=1`.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 2)
}

/// Sends `WATCHDOG=1` every `interval`, for as long as the runtime runs it.
pub async fn run_watchdog(interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}
