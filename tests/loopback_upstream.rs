//! An upstream on this host (a local resolver at `127.0.0.1:5399`) usually listens on the
//! wildcard: it answers at `127.0.0.2`, `::1` and every address of the host as well. A
//! contained user must reach it at none of them (it would resolve any name for the agent),
//! while the rest of loopback and uncontained users keep working. The lab is
//! `common::netns`'s; the contained user runs perl under `setpriv`.

mod common;

use std::net::TcpListener;
use std::process::Output;
use std::time::Duration;

use common::netns::*;
use common::{require_root, require_tool};

const AGENT_UID: u32 = 4242;

fn policy(lab: &Lab) -> String {
    format!(
        "listen: [\"127.0.0.1:53\"]
upstreams: [\"127.0.0.1:5399\"]
upstream_timeout: 2s
allow: [everyone.test]
log: \"-\"
firewall:
  table: {table}
  hooks: [output]
  on_exit: remove
  contain: {{uids: [{AGENT_UID}]}}
",
        table = lab.table(),
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TCP connect to `host` port `port` by a process of `uid` on the gateway (perl,
/// IO::Socket::IP: IPv4 and IPv6), within 0.8 s.
fn connect_as(lab: &Lab, uid: u32, host: &str, port: u16) -> Result<(), String> {
    let id = uid.to_string();
    let script = format!(
        "use IO::Socket::IP; IO::Socket::IP->new(PeerHost => '{host}', PeerPort => {port}, \
         Timeout => 0.8) or do {{ print \"failed: $@\\n\"; exit 1 }}; print \"connected\\n\";"
    );
    let argv = [
        "setpriv",
        "--reuid",
        &id,
        "--regid",
        &id,
        "--clear-groups",
        "timeout",
        "5",
        "perl",
        "-e",
        &script,
    ];
    let out = lab.gw.exec(Duration::from_secs(8), &argv);
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

#[test]
fn a_contained_user_reaches_a_local_upstreams_port_on_no_address_of_the_host() {
    if !require_root("a_contained_user_reaches_a_local_upstreams_port_on_no_address_of_the_host") {
        return;
    }
    for program in ["setpriv", "perl"] {
        require_tool(program);
    }
    let lab = Lab::new("loupstream");
    // The local resolver (stands in: TCP is enough to see a path), on the wildcard, dual
    // stack; and another local service on the next port.
    let (_resolver, _other) = lab.gw.run(|| {
        (
            TcpListener::bind("[::]:5399").unwrap(),
            TcpListener::bind("[::]:5400").unwrap(),
        )
    });
    lab.start_fence(&policy(&lab));
    let everywhere = ["127.0.0.1", "127.0.0.2", "::1", "10.77.0.1", "fd77::1"];
    for host in everywhere {
        // Control: an uncontained user (root) reaches the resolver at each address.
        connect_as(&lab, 0, host, 5399).unwrap_or_else(|e| panic!("root to {host}: {e}"));
        let agent = connect_as(&lab, AGENT_UID, host, 5399);
        assert!(agent.is_err(), "the contained user reached {host}:5399");
    }
    // Control: the rest of loopback still works for the contained user.
    connect_as(&lab, AGENT_UID, "127.0.0.2", 5400).expect("another loopback port");
}
