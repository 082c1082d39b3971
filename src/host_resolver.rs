//! The host's own resolver, as dnsfence finds it at start (`firewall.contain.host_dns`).
//!
//! With `contain`, the processes dnsfence leaves alone include the host's resolvers: a stub
//! such as systemd-resolved answers anyone who asks it (a contained agent too, through NSS,
//! D-Bus or varlink, none of which is a packet the firewall sees) and sends the question on
//! as an uncontained process. With `host_dns: dnsfence` the ruleset lets the host's DNS go to
//! dnsfence only, so such a relay must ask dnsfence; with `direct` it asks whom it likes, and
//! a name the policy denies leaves the host through it.
//!
//! This module only reads a few files and says what it found, once, at start: with `direct`,
//! that a relay is there (so the operator knows the channel is open); with `dnsfence`, that
//! systemd-resolved still names servers the firewall now drops (so host DNS fails until its
//! `DNS=` names dnsfence). It never changes anything: the ruleset is the enforcement.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::policy::{HostDns, Policy};

/// systemd-resolved's runtime directory (its stub and upstream `resolv.conf` live in it).
const RESOLVED_DIR: &str = "run/systemd/resolve";
/// resolved's list of the servers it sends to (written by resolved, `resolv.conf` syntax).
const RESOLVED_UPSTREAMS: &str = "run/systemd/resolve/resolv.conf";
/// nscd's socket: a cache that resolves for every process on the host.
const NSCD_SOCKET: &str = "run/nscd/socket";
const RESOLV_CONF: &str = "etc/resolv.conf";
/// The address of systemd-resolved's stub listener.
const RESOLVED_STUB: &str = "127.0.0.53";

/// The `nameserver` addresses of a `resolv.conf` text, in order; lines that do not parse are
/// skipped (this is advice, not enforcement).
fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|w| w.split('%').next())
                .and_then(|w| w.parse().ok())
        })
        .collect()
}

/// What on the host (below `root`, `/` in production) answers DNS for other processes: one
/// phrase per finding, empty when none was found.
pub fn relays(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if root.join(RESOLVED_DIR).exists() {
        found.push(format!("systemd-resolved (/{RESOLVED_DIR})"));
    }
    let stub: IpAddr = IpAddr::from([127, 0, 0, 53]);
    if let Ok(text) = std::fs::read_to_string(root.join(RESOLV_CONF))
        && nameservers(&text).contains(&stub)
    {
        found.push(format!("/{RESOLV_CONF} names {RESOLVED_STUB}"));
    }
    if root.join(NSCD_SOCKET).exists() {
        found.push(format!("nscd (/{NSCD_SOCKET})"));
    }
    found
}

/// Whether `ip` is one of dnsfence's listen addresses (a wildcard one counts for its family).
fn is_dnsfence(ip: IpAddr, listen: &[SocketAddr]) -> bool {
    listen
        .iter()
        .any(|l| l.ip() == ip || (l.ip().is_unspecified() && l.ip().is_ipv4() == ip.is_ipv4()))
}

/// The lines to print at start about the host's own DNS (each a whole sentence), for a
/// policy whose firewall contains processes on this host; empty otherwise.
pub fn startup_notes(policy: &Policy, root: &Path) -> Vec<String> {
    let fw = &policy.firewall;
    let Some(contain) = fw.contain.as_ref() else {
        return Vec::new();
    };
    if !fw.enabled
        || !fw.hooks.contains(&crate::policy::Hook::Output)
        || !contain.names_local_processes()
    {
        return Vec::new();
    }
    let relays = relays(root);
    match contain.host_dns {
        HostDns::Direct if !relays.is_empty() => vec![format!(
            "warning: firewall.contain.host_dns is direct and this host runs a DNS relay ({}): \
             a contained agent can ask it (NSS, D-Bus, varlink) to resolve any name, and it \
             sends the question out uncontained, denied names included; set host_dns: \
             dnsfence and point the relay at dnsfence",
            relays.join("; ")
        )],
        HostDns::Direct => Vec::new(),
        HostDns::Dnsfence => {
            let listen: Vec<String> = policy.listen.iter().map(ToString::to_string).collect();
            let mut notes = vec![format!(
                "firewall: the host's own DNS (53, 853) reaches dnsfence only \
                 (firewall.contain.host_dns: dnsfence); its resolvers must ask dnsfence at {}",
                listen.join(", ")
            )];
            let upstreams = std::fs::read_to_string(root.join(RESOLVED_UPSTREAMS))
                .map(|t| nameservers(&t))
                .unwrap_or_default();
            let elsewhere: Vec<String> = upstreams
                .iter()
                .filter(|ip| !ip.is_loopback() && !is_dnsfence(**ip, &policy.listen))
                .map(ToString::to_string)
                .collect();
            if !elsewhere.is_empty() {
                notes.push(format!(
                    "warning: systemd-resolved sends to {}, which the firewall drops \
                     (firewall.contain.host_dns: dnsfence), so the host's own lookups will fail: \
                     set DNS= in /etc/systemd/resolved.conf to dnsfence's address ({}) and \
                     restart systemd-resolved, or set host_dns: direct",
                    elsewhere.join(", "),
                    listen.join(", ")
                ));
            }
            notes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    fn policy(host_dns: &str) -> Policy {
        let text = format!(
            "listen: [\"127.0.0.1:53\"]\nupstreams: [\"192.0.2.1:53\"]\nallow: [a.test]\n\
             firewall:\n  hooks: [output]\n  contain: {{uids: [1000], host_dns: {host_dns}}}\n"
        );
        Policy::parse(&text, Path::new("p.yaml")).unwrap()
    }

    #[test]
    fn finds_resolved_by_its_directory_or_its_stub_address() {
        assert!(relays(host(&[]).path()).is_empty());
        let with_stub = host(&[(RESOLV_CONF, "# x\nnameserver 127.0.0.53\noptions edns0\n")]);
        assert_eq!(
            relays(with_stub.path()),
            ["/etc/resolv.conf names 127.0.0.53"]
        );
        let plain = host(&[(RESOLV_CONF, "nameserver 192.0.2.1\n")]);
        assert!(relays(plain.path()).is_empty());
        let resolved = host(&[(
            "run/systemd/resolve/stub-resolv.conf",
            "nameserver 127.0.0.53\n",
        )]);
        assert_eq!(
            relays(resolved.path()),
            ["systemd-resolved (/run/systemd/resolve)"]
        );
    }

    #[test]
    fn direct_warns_only_where_a_relay_runs() {
        let resolved = host(&[(RESOLV_CONF, "nameserver 127.0.0.53\n")]);
        let notes = startup_notes(&policy("direct"), resolved.path());
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("warning: firewall.contain.host_dns is direct"));
        assert!(notes[0].contains("127.0.0.53"), "{notes:?}");
        assert!(startup_notes(&policy("direct"), host(&[]).path()).is_empty());
    }

    #[test]
    fn dnsfence_warns_when_resolved_still_sends_elsewhere() {
        let notes = startup_notes(&policy("dnsfence"), host(&[]).path());
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("reaches dnsfence only"), "{notes:?}");
        let elsewhere = host(&[(
            RESOLVED_UPSTREAMS,
            "nameserver 9.9.9.9\nnameserver 127.0.0.1\n",
        )]);
        let notes = startup_notes(&policy("dnsfence"), elsewhere.path());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[1].contains("sends to 9.9.9.9,"), "{notes:?}");
        let pointed = host(&[(RESOLVED_UPSTREAMS, "nameserver 127.0.0.1\n")]);
        assert_eq!(startup_notes(&policy("dnsfence"), pointed.path()).len(), 1);
    }
}
