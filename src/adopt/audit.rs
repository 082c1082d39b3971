//! The audit clock: while audit mode lasts, say so on stderr once a minute; when it ends, say
//! that dnsfence enforces now, on stderr and in the query log.
//!
//! The clock only talks. The switch itself needs no timer: the pipeline compares the time with
//! `until` on every denial, so enforcement starts at `until` to the query, even if this task
//! were late or gone.

use std::time::{Duration, SystemTime};

use crate::policy::Mode;
use crate::querylog::{EventRecord, QueryLog};

/// How often the audit warning is repeated.
pub const WARNING_EVERY: Duration = Duration::from_secs(60);

/// Runs until audit mode is over (returns at once in enforce mode).
pub async fn audit_clock(mode: Mode, log: QueryLog) {
    let Mode::Audit { until } = mode else {
        return;
    };
    let mut warned_once = false;
    loop {
        let now = SystemTime::now();
        let Ok(left) = until.duration_since(now) else {
            break;
        };
        if left.is_zero() {
            break;
        }
        tracing::warn!(
            until = %humantime::format_rfc3339_seconds(until),
            left = %humantime::format_duration(Duration::from_secs(left.as_secs())),
            "AUDIT MODE: names the policy denies are forwarded and their addresses admitted; \
             dnsfence enforces the policy from `until` on"
        );
        warned_once = true;
        tokio::time::sleep(left.min(WARNING_EVERY)).await;
    }
    if !warned_once {
        // The policy's audit period was over before dnsfence started: nothing switches.
        tracing::info!(
            until = %humantime::format_rfc3339_seconds(until),
            "the audit period has ended: enforcing the policy"
        );
        return;
    }
    tracing::warn!(
        until = %humantime::format_rfc3339_seconds(until),
        "the audit period has ended: dnsfence enforces the policy now"
    );
    let mut fields = serde_json::Map::new();
    fields.insert("mode".into(), "enforce".into());
    fields.insert("was".into(), "audit".into());
    fields.insert(
        "until".into(),
        humantime::format_rfc3339_seconds(until).to_string().into(),
    );
    log.event(EventRecord {
        time: SystemTime::now(),
        event: "mode",
        fields,
    });
}
