//! `listen`, `upstreams`, `upstream_timeout` and `upstream_order`: where dnsfence serves and
//! whom it asks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::super::diagnostic::{Pos, Report};
use super::super::net::Role;
use super::super::raw::{Node, Value};
use super::super::read::{self, Fields};
use super::super::{UpstreamOptions, UpstreamOrder};

/// The checked endpoints of a policy.
pub(super) struct Endpoints {
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    pub upstream_timeout: Duration,
    pub upstream_options: UpstreamOptions,
}

pub(super) fn read(r: &mut Report, f: &Fields<'_>) -> Endpoints {
    let listen_node = f.required(r, "listen", "listen: [\"127.0.0.1:53\"]");
    let listen = socket_list(r, listen_node, "listen", Role::Listen);
    let upstreams_node = f.required(r, "upstreams", "upstreams: [\"9.9.9.9:53\"]");
    let upstreams = socket_list(r, upstreams_node, "upstreams", Role::Upstream);
    check_no_loop(r, &listen, &upstreams);
    let upstream_timeout =
        read::nonzero_duration(r, f.get("upstream_timeout"), "upstream_timeout", 2);
    let order = f
        .get("upstream_order")
        .and_then(|n| {
            read::choice(
                r,
                n,
                "upstream_order",
                &[
                    ("fastest", UpstreamOrder::Fastest),
                    ("strict", UpstreamOrder::Strict),
                ],
            )
        })
        .unwrap_or_default();
    Endpoints {
        listen: listen.into_iter().map(|(_, a)| a).collect(),
        upstreams: upstreams.into_iter().map(|(_, a)| a).collect(),
        upstream_timeout,
        upstream_options: UpstreamOptions { order },
    }
}

/// A non-empty list of distinct socket addresses.
fn socket_list(
    r: &mut Report,
    node: Option<&Node>,
    what: &str,
    role: Role,
) -> Vec<(Pos, SocketAddr)> {
    let Some(node) = node else {
        return Vec::new();
    };
    let addrs = read::sockets(r, node, what, role);
    if matches!(&node.value, Value::Seq(items) if items.is_empty()) || node.value == Value::Null {
        let example = match role {
            Role::Listen => "[\"127.0.0.1:53\"]",
            Role::Upstream => "[\"9.9.9.9:53\"]",
        };
        r.error(
            node.pos,
            format!("{what} is empty; list at least one address, e.g. {what}: {example}"),
        );
    }
    let mut seen: HashMap<SocketAddr, Pos> = HashMap::new();
    for &(pos, addr) in &addrs {
        if let Some(first) = seen.insert(addr, pos) {
            r.error(
                pos,
                format!(
                    "{what}: \"{addr}\" is listed twice (also on line {}); remove one of them",
                    first.line
                ),
            );
        }
    }
    addrs
}

/// An upstream that is one of our own listening sockets would loop queries forever.
fn check_no_loop(r: &mut Report, listen: &[(Pos, SocketAddr)], upstreams: &[(Pos, SocketAddr)]) {
    for &(pos, up) in upstreams {
        for &(lpos, l) in listen {
            if l == up {
                r.error(
                    pos,
                    format!(
                        "upstream \"{up}\" is dnsfence's own listen address (line {}), so \
                         queries would loop; write the address of another resolver",
                        lpos.line
                    ),
                );
            } else if l.ip().is_unspecified() && l.port() == up.port() && up.ip().is_loopback() {
                r.warn(
                    pos,
                    format!(
                        "upstream \"{up}\" may be dnsfence itself: it listens on \"{l}\" \
                         (line {}); make sure another resolver serves this address",
                        lpos.line
                    ),
                );
            }
        }
    }
}
