//! `listen`, `upstreams`, `upstream_timeout` and `upstream_order`: where dnsfence serves and
//! whom it asks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::super::diagnostic::{Pos, Report};
use super::super::net::{self, Role};
use super::super::raw::{Node, Value};
use super::super::read::{self, Fields};
use super::super::validate;
use super::super::{UpstreamOptions, UpstreamOrder, UpstreamTransport};

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
    let (upstreams, transports) = upstream_list(r, upstreams_node);
    check_no_loop(r, &listen, &upstreams);
    let upstream_timeout = read::duration_in(
        r,
        f.get("upstream_timeout"),
        "upstream_timeout",
        validate::UPSTREAM_TIMEOUT_RANGE,
        Duration::from_secs(2),
    );
    super::report(r, f, validate::upstream_timeout_problems(upstream_timeout));
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
    let tls_ca = f.get("upstream_tls_ca").and_then(|n| tls_ca(r, n));
    Endpoints {
        listen: listen.into_iter().map(|(_, a)| a).collect(),
        upstreams: upstreams.into_iter().map(|(_, a)| a).collect(),
        upstream_timeout,
        upstream_options: UpstreamOptions {
            order,
            transports,
            tls_ca,
        },
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
    check_list(r, node, what, role, &addrs);
    addrs
}

/// `upstreams`: addresses, each optionally `tcp://` (TCP only) or `tls://ADDR#NAME` (DNS over
/// TLS, the certificate checked against NAME).
#[allow(clippy::type_complexity)]
fn upstream_list(
    r: &mut Report,
    node: Option<&Node>,
) -> (Vec<(Pos, SocketAddr)>, Vec<(SocketAddr, UpstreamTransport)>) {
    let what = "upstreams";
    let Some(node) = node else {
        return (Vec::new(), Vec::new());
    };
    let mut addrs = Vec::new();
    let mut transports = Vec::new();
    for item in read::list(r, node, what).unwrap_or_default() {
        let Some(text) = read::text(r, item, what) else {
            continue;
        };
        match parse_upstream(text) {
            Ok((addr, transport)) => {
                addrs.push((item.pos, addr));
                if transport != UpstreamTransport::Udp {
                    transports.push((addr, transport));
                }
            }
            Err(e) => r.error(item.pos, format!("{what}: {e}")),
        }
    }
    check_list(r, node, what, Role::Upstream, &addrs);
    (addrs, transports)
}

fn parse_upstream(text: &str) -> Result<(SocketAddr, UpstreamTransport), String> {
    if let Some(rest) = text.strip_prefix("tcp://") {
        let addr = net::parse_socket(rest, Role::Upstream)?;
        return Ok((addr, UpstreamTransport::Tcp));
    }
    if let Some(rest) = text.strip_prefix("tls://") {
        let Some((addr, name)) = rest.split_once('#') else {
            return Err(format!(
                "{text:?} names no certificate; write the name the upstream's certificate \
                 carries after #, such as \"tls://9.9.9.9:853#dns.quad9.net\""
            ));
        };
        let addr = net::parse_socket(addr, Role::Upstream)?;
        let plain = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let name = name.trim_end_matches('.');
        if name.len() > 253 || !name.split('.').all(plain) {
            return Err(format!(
                "{text:?}: {name:?} is not a host name; write the name on the upstream's \
                 certificate, such as \"tls://9.9.9.9:853#dns.quad9.net\""
            ));
        }
        return Ok((
            addr,
            UpstreamTransport::Tls {
                name: name.to_ascii_lowercase(),
            },
        ));
    }
    if let Some((scheme, _)) = text.split_once("://") {
        return Err(format!(
            "{text:?}: unknown scheme {scheme:?}; write an address (UDP, TCP for long \
             answers), \"tcp://ADDRESS:PORT\" or \"tls://ADDRESS:853#NAME\""
        ));
    }
    Ok((
        net::parse_socket(text, Role::Upstream)?,
        UpstreamTransport::Udp,
    ))
}

/// `upstream_tls_ca`: a readable PEM file with at least one certificate (read again, and
/// parsed, when the server starts).
fn tls_ca(r: &mut Report, node: &Node) -> Option<PathBuf> {
    let path = read::text(r, node, "upstream_tls_ca")?;
    match std::fs::read_to_string(path) {
        Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => Some(PathBuf::from(path)),
        Ok(_) => {
            r.error(
                node.pos,
                format!(
                    "upstream_tls_ca: {path:?} holds no PEM certificate; write the path of a \
                     file with \"-----BEGIN CERTIFICATE-----\" blocks"
                ),
            );
            None
        }
        Err(error) => {
            r.error(
                node.pos,
                format!(
                    "upstream_tls_ca: cannot read {path:?}: {error}; write the path of a PEM \
                     file of CA certificates"
                ),
            );
            None
        }
    }
}

/// The checks every address list gets: not empty, no address twice.
fn check_list(r: &mut Report, node: &Node, what: &str, role: Role, addrs: &[(Pos, SocketAddr)]) {
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
    for &(pos, addr) in addrs {
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
