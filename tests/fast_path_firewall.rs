//! The fast path's admission-freshness check against the real firewall.
//!
//! A cache hit leaves on the fast path (`pipeline/fast.rs`) without asking the kernel only
//! while the firewall acknowledged each of its addresses *for that client* less than 10 s ago
//! (`Admitter::covered`); otherwise it goes through admission first. Checked here with the
//! real binary in a gateway namespace, the kernel's own set contents (`nft -j list set`) and
//! real TCP connects from two agents, with `per_client` on.

mod common;

use std::time::{Duration, Instant};

use common::netns::*;
use common::{addresses, require_root, sa};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

/// How long an acknowledgement lets answers skip the kernel (`admission::REFRESH_AFTER`).
const FRESH_FOR: Duration = Duration::from_secs(10);

const NAME: &str = "shared.allowed.test";
const DEST: &str = "198.51.100.10";

fn policy(lab: &Lab) -> String {
    format!(
        "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
allow: [\"{NAME}\"]
qtypes: [A]
log: \"-\"
ttl: {{min: 30s, max: 3600s, grace: 30s}}
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  per_client: true
  on_exit: remove
",
        upstream = addr::UPSTREAM,
        table = lab.table(),
    )
}

fn assert_answered(reply: &Message, what: &str) {
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "{what}: {reply:?}"
    );
    assert_eq!(addresses(reply), [DEST], "{what}");
}

/// Whether the kernel's allow4 set holds `client . DEST` now.
fn admitted_for(lab: &Lab, client: &str) -> bool {
    has_elem(&lab.set_elements("allow4"), &[client, DEST])
}

#[test]
fn a_cached_answer_skips_the_kernel_only_for_the_client_it_was_acknowledged_for_and_only_for_10_s()
{
    if !require_root("fast_path_freshness") {
        return;
    }
    let lab = Lab::new("fastfresh");
    lab.upstream.a(NAME, DEST, 300);
    lab.start_fence(&policy(&lab));
    let (a1, a2) = (lab.a1(), lab.a2());
    let (c1, c2) = ("10.77.0.2", "10.78.0.2");
    let target = sa(DEST, 80);

    // agent1's miss: admitted for agent1 (and only agent1) before the answer left.
    assert_answered(&a1.resolve(NAME, RecordType::A), "agent1's first answer");
    let acknowledged = Instant::now();
    assert!(admitted_for(&lab, c1), "agent1's element after its answer");
    assert!(!admitted_for(&lab, c2), "agent2 has asked nothing yet");
    assert_eq!(a1.probe(target, CONNECT_OK), Reach::Connected, "agent1");
    assert!(a2.probe(target, BLOCKED_AFTER).is_blocked(), "agent2");

    // Deleted behind dnsfence's back: a hit within the freshness window is answered without
    // asking the kernel, so the element stays missing and agent1 fails closed meanwhile.
    let table = lab.table();
    let element = format!("{{ {c1} . {DEST} }}");
    let deleted = lab.gw.exec(
        Duration::from_secs(10),
        &[
            "nft", "delete", "element", "inet", &table, "allow4", &element,
        ],
    );
    assert!(deleted.status.success(), "nft delete element: {deleted:?}");
    assert_answered(&a1.resolve(NAME, RecordType::A), "agent1's hit");
    assert!(
        acknowledged.elapsed() < FRESH_FOR,
        "the machine took {:?} for a few steps: the window this test checks is over",
        acknowledged.elapsed()
    );
    assert!(
        !admitted_for(&lab, c1),
        "agent1's hit within {FRESH_FOR:?} asked the kernel"
    );
    assert!(a1.probe(target, BLOCKED_AFTER).is_blocked(), "agent1 now");

    // agent2's question is a cache hit too (the upstream is not asked again), but agent1's
    // acknowledgement covers nothing of agent2's: it is admitted for agent2 before it leaves.
    assert_answered(&a2.resolve(NAME, RecordType::A), "agent2's hit");
    assert!(
        admitted_for(&lab, c2),
        "agent2's element must be in the set when its answer arrives: {:?}",
        lab.set_elements("allow4")
    );
    assert_eq!(
        lab.upstream.seen_for(NAME).len(),
        1,
        "the upstream was asked once: agent2's answer was a cache hit"
    );
    assert_eq!(a2.probe(target, CONNECT_OK), Reach::Connected, "agent2");
    assert!(
        !admitted_for(&lab, c1),
        "agent2's admission re-added agent1's element"
    );

    // Once the acknowledgement is older than the window, agent1's next hit asks the kernel
    // again: the element is back before the answer, and so is agent1's reach.
    std::thread::sleep(
        (FRESH_FOR + Duration::from_millis(500)).saturating_sub(acknowledged.elapsed()),
    );
    assert_answered(
        &a1.resolve(NAME, RecordType::A),
        "agent1's hit after the window",
    );
    assert!(
        admitted_for(&lab, c1),
        "agent1's hit after {FRESH_FOR:?} did not re-admit its element"
    );
    assert_eq!(
        a1.probe(target, CONNECT_OK),
        Reach::Connected,
        "agent1 again"
    );
}
