//! The metrics and health endpoint of the real binary: exact counters after scripted traffic,
//! health and readiness, and never an answer on an address agents can reach.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// `GET path` over HTTP/1.1: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: metrics\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Every sample of a Prometheus text page, by its full series name (`name{labels}`).
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn metrics_policy(upstream: &Upstream, port: u16) -> String {
    policy(
        upstream.addr,
        &["api.allowed.test"],
        &format!("metrics:\n  listen: \"127.0.0.1:{port}\"\n"),
    )
}

#[test]
fn counters_move_by_exactly_the_queries_sent() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    upstream.a("evil.example.org", "198.51.100.66", 300);
    let port = free_port();
    let fence = Dnsfence::start(&metrics_policy(&upstream, port));
    let endpoint: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, before) = get(endpoint, "/metrics").unwrap();
    assert_eq!(status, 200, "{before}");
    let before = samples(&before);

    for _ in 0..3 {
        assert_eq!(
            fence
                .udp("api.allowed.test", RecordType::A)
                .metadata
                .response_code,
            ResponseCode::NoError
        );
    }
    fence.tcp("api.allowed.test", RecordType::A);
    for _ in 0..2 {
        fence.udp("evil.example.org", RecordType::A);
    }
    fence.udp("api.allowed.test", RecordType::TXT);
    fence.udp("printer.local", RecordType::A);
    // A header that parses, then nothing: FORMERR, logged malformed.
    let mut garbage = query("api.allowed.test", RecordType::A).to_vec().unwrap();
    garbage.truncate(14);
    query_udp_bytes(fence.addr, &garbage).unwrap();
    let sent = 9;
    assert_eq!(fence.log(sent).len(), sent);

    // Two reloads by SIGHUP: the same file (ok), then a broken one (invalid, refused).
    let pid = nix::unistd::Pid::from_raw(i32::try_from(fence.pid()).unwrap());
    let policy_path = fence.dir.path().join("policy.yaml");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert_eq!(fence.log(sent + 1).len(), sent + 1, "the ok reload's event");
    let good = std::fs::read_to_string(&policy_path).unwrap();
    std::fs::write(&policy_path, format!("{good}no_such_key: 1\n")).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let log = fence.log(sent + 2);
    assert_eq!(log.len(), sent + 2, "the invalid reload's event");
    assert_eq!(log[sent]["result"], "ok", "{log:?}");
    assert_eq!(log[sent + 1]["result"], "invalid", "{log:?}");

    let (_, after) = get(endpoint, "/metrics").unwrap();
    let after_page = after.clone();
    let after = samples(&after);
    let delta = |series: &str| {
        after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
    };
    let q = |transport: &str, qtype: &str, decision: &str, reason: &str| {
        format!(
            "dnsfence_queries_total{{transport=\"{transport}\",qtype=\"{qtype}\",\
             decision=\"{decision}\",reason=\"{reason}\",group=\"default\"}}"
        )
    };
    for (series, want) in [
        (q("udp", "A", "allow", ""), 3.0),
        (q("tcp", "A", "allow", ""), 1.0),
        (q("udp", "A", "deny", "policy"), 2.0),
        (q("udp", "TXT", "deny", "qtype"), 1.0),
        (q("udp", "A", "deny", "special-use"), 1.0),
        (q("udp", "other", "deny", "malformed"), 1.0),
        (
            "dnsfence_responses_total{rcode=\"NOERROR\"}".to_owned(),
            4.0,
        ),
        (
            "dnsfence_responses_total{rcode=\"NXDOMAIN\"}".to_owned(),
            4.0,
        ),
        (
            "dnsfence_responses_total{rcode=\"FORMERR\"}".to_owned(),
            1.0,
        ),
        ("dnsfence_request_duration_seconds_count".to_owned(), 9.0),
        (
            format!(
                "dnsfence_upstream_requests_total{{upstream=\"{}\",result=\"answer\"}}",
                upstream.addr
            ),
            4.0,
        ),
        // api.allowed.test A: asked upstream once, then three times from the cache.
        ("dnsfence_cache_misses_total".to_owned(), 1.0),
        ("dnsfence_cache_hits_total".to_owned(), 3.0),
        ("dnsfence_cache_entries".to_owned(), 1.0),
        (
            format!(
                "dnsfence_upstream_duration_seconds_count{{upstream=\"{}\"}}",
                upstream.addr
            ),
            1.0,
        ),
        (
            "dnsfence_policy_reloads_total{result=\"ok\"}".to_owned(),
            1.0,
        ),
        (
            "dnsfence_policy_reloads_total{result=\"invalid\"}".to_owned(),
            1.0,
        ),
        (
            "dnsfence_firewall_revoked_total{cause=\"reload\"}".to_owned(),
            0.0,
        ),
    ] {
        assert_eq!(delta(&series), want, "{series}\n{after_page}");
    }
    let all_queries: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("dnsfence_queries_total{"))
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
        .sum();
    assert_eq!(all_queries, sent as f64, "{after_page}");
    assert_eq!(
        after.get("dnsfence_mode{mode=\"enforce\"}"),
        Some(&1.0),
        "{after_page}"
    );
    assert_eq!(
        after.get(&format!(
            "dnsfence_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(&1.0)
    );
    assert_eq!(
        after.get("dnsfence_grants_active"),
        Some(&0.0),
        "{after_page}"
    );
    assert_eq!(
        after.get("dnsfence_querylog_dropped_total"),
        Some(&0.0),
        "{after_page}"
    );
    // The firewall is off: no firewall series, and no drop explanations.
    assert!(!after_page.contains("dnsfence_firewall_elements"));
    assert!(!after_page.contains("dnsfence_firewall_drops"));
    // No per-client series unless asked for.
    assert!(!after_page.contains("dnsfence_client_queries"));
}

#[test]
fn health_and_readiness_answer_once_serving() {
    let upstream = Upstream::start();
    let port = free_port();
    let _fence = Dnsfence::start(&metrics_policy(&upstream, port));
    let endpoint: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The heartbeat runs every second: give it one.
    std::thread::sleep(Duration::from_millis(1200));
    let (status, body) = get(endpoint, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(endpoint, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], true, "{body}");
    assert_eq!(report["firewall"], "disabled", "{body}");
    let (status, _) = get(endpoint, "/elsewhere").unwrap();
    assert_eq!(status, 404);
}

#[test]
fn check_refuses_a_metrics_address_agents_could_reach() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let base = policy("127.0.0.1:5300".parse().unwrap(), &["api.allowed.test"], "");
    for listen in [
        "0.0.0.0:9153",
        "[::]:9153",
        "10.0.0.1:9153",
        "[::ffff:127.0.0.1]:9153",
    ] {
        std::fs::write(&path, format!("{base}metrics:\n  listen: \"{listen}\"\n")).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--policy"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{listen}: {stderr}");
        assert!(
            stderr.contains("policy.yaml:9:11: metrics.listen") && stderr.contains("loopback"),
            "{listen}: {stderr}"
        );
    }
    // The control: loopback is accepted.
    std::fs::write(
        &path,
        format!("{base}metrics: {{listen: \"127.0.0.1:9153\"}}\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// This host's address on the interface of its default route, if it has one (a UDP `connect`
/// sends nothing).
fn host_address() -> Option<std::net::IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn the_endpoint_answers_on_loopback_only() {
    let upstream = Upstream::start();
    let port = free_port();
    let _fence = Dnsfence::start(&metrics_policy(&upstream, port));
    let loopback: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(get(loopback, "/metrics").unwrap().0, 200);
    let Some(host) = host_address() else {
        panic!("this machine has no non-loopback address to try the endpoint on");
    };
    let outside = SocketAddr::new(host, port);
    let tried = TcpStream::connect_timeout(&outside, Duration::from_secs(2));
    assert!(
        tried.is_err(),
        "the metrics endpoint answered on {outside}, an address agents can reach"
    );
}

/// In namespaces, with the firewall on: the gateway's own loopback reads the endpoint (ready,
/// healthy, admissions counted); an agent behind the gateway reaches it on no address.
#[test]
fn with_the_firewall_the_endpoint_is_ready_healthy_and_out_of_the_agents_reach() {
    use common::netns::*;
    if !require_root("with_the_firewall_the_endpoint_is_ready_healthy_and_out_of_the_agents_reach")
    {
        return;
    }
    let lab = Lab::new("metrics");
    lab.upstream.a("api.allowed.test", "198.51.100.20", 300);
    lab.start_fence(&format!(
        "listen: [\"10.77.0.1:53\"]\nupstreams: [\"{}\"]\nallow: [api.allowed.test]\n\
         firewall:\n  enabled: true\n  table: {}\n  hooks: [output, forward]\n  on_exit: remove\n\
         metrics: {{listen: \"127.0.0.1:9153\"}}\n",
        addr::UPSTREAM,
        lab.table()
    ));
    let endpoint: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let (status, body) = lab.gw.run(move || get(endpoint, "/readyz")).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"firewall\":\"installed\""), "{body}");
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = lab.gw.run(move || get(endpoint, "/healthz")).unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "firewall thread answers"
    );

    let a1 = lab.a1();
    let reply = a1.resolve("api.allowed.test", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.20"]);
    let (_, page) = lab.gw.run(move || get(endpoint, "/metrics")).unwrap();
    let page = samples(&page);
    assert_eq!(
        page.get("dnsfence_firewall_admissions_total{family=\"ipv4\",result=\"admitted\"}"),
        Some(&1.0)
    );
    assert_eq!(
        page.get("dnsfence_firewall_capacity{set=\"allow4\"}"),
        Some(&65536.0)
    );
    // The live element count comes with the firewall thread's heartbeat, once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let elements = loop {
        let (_, page) = lab.gw.run(move || get(endpoint, "/metrics")).unwrap();
        let page = samples(&page);
        let elements = page
            .get("dnsfence_firewall_elements{set=\"allow4\"}")
            .copied();
        if elements == Some(1.0) || std::time::Instant::now() > deadline {
            break (
                elements,
                page.get("dnsfence_firewall_elements{set=\"allow6\"}")
                    .copied(),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(elements, (Some(1.0), Some(0.0)));

    // The agent tries every address of the gateway on the metrics port; the gateway's own
    // loopback (the control) gets through.
    let targets = [
        SocketAddr::new(addr::GW_A1_4.into(), 9153),
        SocketAddr::new(addr::GW_A1_6.into(), 9153),
        SocketAddr::new(addr::GW_INET4.into(), 9153),
        SocketAddr::new(addr::GW_A2_4.into(), 9153),
    ];
    for (target, reach) in targets.iter().zip(a1.probe_all(&targets, BLOCKED_AFTER)) {
        assert_ne!(
            reach,
            Reach::Connected,
            "agent reached the metrics endpoint at {target}"
        );
    }
    assert_eq!(
        lab.gw.run(move || tcp_probe(endpoint, CONNECT_OK)),
        Reach::Connected
    );
}
