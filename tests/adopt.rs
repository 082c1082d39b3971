//! Adopting a policy from what the agent does: audit mode, `suggest` and `replay`, with the
//! real binary, a scripted upstream on loopback and the query logs the binary wrote.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The log lines for `qname`, waiting until there are at least `at_least` of them.
fn lines_for(fence: &Dnsfence, qname: &str, at_least: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<_> = read_log(&fence.log_path)
            .into_iter()
            .filter(|l| l["qname"] == fqdn(qname))
            .collect();
        if lines.len() >= at_least || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn audit_mode_forwards_denied_names_until_its_end_then_answers_them_locally_without_a_restart() {
    let upstream = Upstream::start();
    upstream.a("denied.example.org", "198.51.100.20", 300);
    upstream.txt("api.allowed.test", "hello", 300);
    let until = SystemTime::now() + Duration::from_secs(10);
    let extra = format!("mode: audit\naudit:\n  until: \"{}\"\n", rfc3339(until));
    let fence = Dnsfence::start(&policy(upstream.addr, &["api.allowed.test"], &extra));

    // Before `until`: the denied name and the denied type are forwarded and answered.
    let reply = fence.udp("denied.example.org", RecordType::A);
    assert!(
        SystemTime::now() < until,
        "the machine is too slow for this test"
    );
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&reply), ["198.51.100.20"]);
    let reply = fence.tcp("api.allowed.test", RecordType::TXT);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(upstream.seen_for("denied.example.org").len(), 1);
    assert_eq!(upstream.seen_for("api.allowed.test").len(), 1);

    let audited = &lines_for(&fence, "denied.example.org", 1)[0];
    assert_eq!(audited["decision"], "deny", "{audited}");
    assert_eq!(audited["audit"], true, "{audited}");
    assert_eq!(audited["reason"], "policy", "{audited}");
    assert_eq!(audited["rcode"], "NOERROR", "{audited}");
    assert_eq!(audited["group"], "default", "{audited}");
    assert!(audited.get("rule").is_none(), "{audited}");
    let txt = &lines_for(&fence, "api.allowed.test", 1)[0];
    assert_eq!(
        (&txt["decision"], &txt["audit"], &txt["reason"]),
        (
            &serde_json::json!("deny"),
            &serde_json::json!(true),
            &serde_json::json!("qtype")
        ),
        "{txt}"
    );

    // Special-use names stay denied in audit mode, and are logged without `audit`.
    let reply = fence.udp("printer.local", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    let special = &lines_for(&fence, "printer.local", 1)[0];
    assert_eq!(special["reason"], "special-use", "{special}");
    assert!(special.get("audit").is_none(), "{special}");

    // After `until`, the same process enforces.
    while SystemTime::now() <= until + Duration::from_millis(100) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for reply in fence.both("denied.example.org", RecordType::A) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert!(reply.answers.is_empty());
    }
    assert_eq!(
        upstream.seen_for("denied.example.org").len(),
        1,
        "the upstream saw the name after audit mode ended"
    );
    let lines = lines_for(&fence, "denied.example.org", 3);
    for enforced in &lines[1..] {
        assert_eq!(enforced["decision"], "deny", "{enforced}");
        assert_eq!(enforced["reason"], "policy", "{enforced}");
        assert!(enforced.get("audit").is_none(), "{enforced}");
    }
    // The switch is in the query log, written by the server itself.
    let deadline = Instant::now() + Duration::from_secs(5);
    let switch = loop {
        let found = read_log(&fence.log_path)
            .into_iter()
            .find(|l| l["event"] == "mode");
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no mode event in the log");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(switch["mode"], "enforce", "{switch}");
    assert_eq!(switch["was"], "audit", "{switch}");
}

#[test]
fn rebinding_stays_enforced_in_audit_mode() {
    let upstream = Upstream::start();
    upstream.a("internal.example.org", "10.0.0.5", 300);
    upstream.a("router.allowed.test", "192.168.1.1", 300);
    let fence = Dnsfence::start_with_args(
        &policy(upstream.addr, &["router.allowed.test"], ""),
        &["--audit-for", "1h"],
    );
    for name in ["internal.example.org", "router.allowed.test"] {
        for reply in fence.both(name, RecordType::A) {
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
            assert!(reply.answers.is_empty(), "{name}");
        }
        for line in lines_for(&fence, name, 2) {
            assert_eq!(line["reason"], "rebinding", "{line}");
            assert!(line.get("audit").is_none(), "{line}");
        }
    }
    // The control: a public answer for a denied name does go through in the same run.
    upstream.a("public.example.org", "198.51.100.30", 300);
    let reply = fence.udp("public.example.org", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.30"]);
}

#[test]
fn over_long_wildcard_names_are_audited_not_dropped_in_audit_mode() {
    let upstream = Upstream::start();
    let long = format!("{}.cdn.allowed.test", "a".repeat(50));
    upstream.a(&long, "198.51.100.40", 300);
    let fence = Dnsfence::start_with_args(
        &policy(upstream.addr, &["*.cdn.allowed.test"], ""),
        &["--mode", "audit", "--audit-for", "1h"],
    );
    let reply = fence.udp(&long, RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.40"]);
    let line = &lines_for(&fence, &long, 1)[0];
    assert_eq!(line["reason"], "exfiltration-budget", "{line}");
    assert_eq!(line["audit"], true, "{line}");
    assert_eq!(line["rule"], "*.cdn.allowed.test", "{line}");
}

#[test]
fn audit_mode_without_an_end_is_refused_by_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let base = policy("127.0.0.1:5300".parse().unwrap(), &["api.allowed.test"], "");
    std::fs::write(&path, format!("{base}mode: audit\n")).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("policy.yaml:8:7"), "{stderr}");
    assert!(stderr.contains("audit: {until:"), "{stderr}");

    std::fs::write(&path, &base).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--mode", "audit", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--audit-for"), "{stderr}");

    // An end in the past loads (with a warning) and means enforce.
    std::fs::write(
        &path,
        format!("{base}mode: audit\naudit: {{until: \"2020-01-01T00:00:00Z\"}}\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("has passed"), "{stderr}");
}

/// A UDP query sent from `source` (any 127/8 address works on loopback).
fn udp_from(source: &str, fence: &Dnsfence, qname: &str) -> hickory_proto::op::Message {
    udp_from_to(source, &fence.addr.to_string(), qname)
}

fn udp_from_to(source: &str, server: &str, qname: &str) -> hickory_proto::op::Message {
    let server: std::net::SocketAddr = server.parse().unwrap();
    let socket = std::net::UdpSocket::bind((source, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let message = query(qname, RecordType::A);
    socket.send_to(&message.to_vec().unwrap(), server).unwrap();
    let mut buf = vec![0u8; 4096];
    let (len, _) = socket.recv_from(&mut buf).unwrap();
    hickory_proto::op::Message::from_vec(&buf[..len]).unwrap()
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn yaml(text: &str) -> serde_json::Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Appends the suggested lists to the policy's (the merge an operator does by hand).
fn merge(policy: &mut serde_json::Value, suggestion: &serde_json::Value) {
    if let Some(rules) = suggestion["allow"].as_array() {
        policy["allow"]
            .as_array_mut()
            .unwrap()
            .extend(rules.clone());
    }
    for group in suggestion["clients"].as_array().into_iter().flatten() {
        let target = policy["clients"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|g| g["name"] == group["name"])
            .expect("suggested group exists in the policy");
        target["allow"]
            .as_array_mut()
            .unwrap()
            .extend(group["allow"].as_array().unwrap().clone());
    }
}

#[test]
fn suggest_turns_an_audit_log_into_rules_that_check_and_replay_accept_and_leaves_data_out() {
    let upstream = Upstream::start();
    let data_name = "k7q2x9m4w8z1p5n3v6b0.example.org";
    let long_name = format!("{}.example.net", "x".repeat(45));
    let default_names = [
        "api.allowed.test",
        "pypi.example.org",
        "a.cdn.example.org",
        "b.cdn.example.org",
        "c.cdn.example.org",
        data_name,
        &long_name,
    ];
    let research_names = [
        "models.allowed.test",
        "hf.example.com",
        "a.github.io",
        "b.github.io",
        "c.github.io",
    ];
    for (i, name) in default_names.iter().chain(&research_names).enumerate() {
        upstream.a(name, &format!("198.51.100.{}", 100 + i), 300);
    }
    let policy_yaml = format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"{}\"]\nupstream_timeout: 1s\n\
         allow: [api.allowed.test]\nclients:\n  - name: research\n    from: [\"::1/128\"]\n    \
         allow: [models.allowed.test]\nfirewall: {{enabled: false}}\n",
        upstream.addr
    );
    // The research client is ::1: every address of 127/8 is the one loopback client
    // 127.0.0.1 (any local process may bind them), so IPv6 loopback is the other client.
    let listen6 = format!("[::1]:{}", common::free_port());
    let mut fence =
        Dnsfence::start_with_args(&policy_yaml, &["--audit-for", "1h", "--listen", &listen6]);
    for name in default_names {
        assert_eq!(
            addresses(&udp_from("127.0.0.1", &fence, name)).len(),
            1,
            "{name}"
        );
    }
    assert_eq!(
        addresses(&fence.udp("pypi.example.org", RecordType::A)).len(),
        1
    );
    for name in research_names {
        assert_eq!(
            addresses(&udp_from_to("::1", &listen6, name)).len(),
            1,
            "{name}"
        );
    }
    let queries = default_names.len() + 1 + research_names.len();
    assert_eq!(fence.log(queries).len(), queries);
    fence.stop();
    let dir = fence.dir.path().to_owned();
    let policy_path = dir.join("policy.yaml");
    let log = fence.log_path.to_str().unwrap().to_owned();

    let (code, suggestion, stderr) = run(&[
        "suggest",
        "--log",
        &log,
        "--policy",
        policy_path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    eprintln!("{suggestion}");
    let rules: String = suggestion
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        rules,
        "allow:\n  - \"*.cdn.example.org\"\n  - pypi.example.org\nclients:\n  - name: research\n    \
         allow:\n      - a.github.io\n      - b.github.io\n      - c.github.io\n      - hf.example.com\n"
    );
    // The evidence and the names left out, with their reasons.
    assert!(
        suggestion.contains("# 2 queries from 127.0.0.1; A; "),
        "{suggestion}"
    );
    assert!(
        suggestion.contains(&format!("#   {data_name} (group default): looks like data")),
        "{suggestion}"
    );
    assert!(
        suggestion.contains(&format!(
            "#   {long_name} (group default): over exfiltration.max_label_length (40)"
        )),
        "{suggestion}"
    );

    let mut merged = yaml(&policy_yaml);
    merge(&mut merged, &yaml(&suggestion));
    let merged_text = serde_json::to_string_pretty(&merged).unwrap();
    assert!(!merged_text.contains(data_name) && !merged_text.contains(&long_name));
    let merged_path = dir.join("merged.json");
    std::fs::write(&merged_path, &merged_text).unwrap();
    let merged_arg = merged_path.to_str().unwrap();
    let (code, _, stderr) = run(&["check", "--policy", merged_arg]);
    assert_eq!(code, Some(0), "{stderr}\n{merged_text}");

    let (code, report, stderr) = run(&["replay", "--log", &log, "--policy", merged_arg]);
    assert_eq!(code, Some(0), "{report}{stderr}");
    assert!(report.contains("(0 allowed -> denied)"), "{report}");
    assert!(
        report.contains("deny (policy) -> allow") && report.contains("a.cdn.example.org."),
        "{report}"
    );
    for left_out in [data_name, long_name.as_str()] {
        assert!(!report.contains(left_out), "{left_out} changed:\n{report}");
    }

    // The control: a policy that drops an allowed name makes replay fail and say which.
    let mut narrowed = yaml(&policy_yaml);
    narrowed["allow"] = serde_json::json!(["other.allowed.test"]);
    let narrowed_path = dir.join("narrowed.json");
    std::fs::write(&narrowed_path, narrowed.to_string()).unwrap();
    let (code, report, _) = run(&[
        "replay",
        "--log",
        &log,
        "--policy",
        narrowed_path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("allow -> deny") && l.contains("api.allowed.test.")),
        "{report}"
    );
}

#[test]
fn why_names_what_resolved_to_an_address_until_when_and_what_never_did() {
    let upstream = Upstream::start();
    upstream.a("a.allowed.test", "198.51.100.50", 60);
    upstream.a("b.allowed.test", "198.51.100.50", 60);
    upstream.a("short.allowed.test", "198.51.100.51", 1);
    let yaml = policy(
        upstream.addr,
        &["a.allowed.test", "b.allowed.test", "short.allowed.test"],
        "ttl: {min: 1s, max: 60s, grace: 1s}\n",
    );
    let mut fence = Dnsfence::start(&yaml);
    for name in ["a.allowed.test", "b.allowed.test", "short.allowed.test"] {
        assert_eq!(
            addresses(&fence.udp(name, RecordType::A)).len(),
            1,
            "{name}"
        );
    }
    assert_eq!(fence.log(3).len(), 3);
    fence.stop();
    let log = fence.log_path.to_str().unwrap().to_owned();
    let policy_path = fence.dir.path().join("policy.yaml");
    let policy_arg = policy_path.to_str().unwrap();

    let (code, out, err) = run(&[
        "why",
        "198.51.100.50",
        "--log",
        &log,
        "--policy",
        policy_arg,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.starts_with("198.51.100.50: admitted now for any client"),
        "{out}"
    );
    assert!(
        out.contains("  a.allowed.test for 127.0.0.1: 1 query")
            && out.contains("  b.allowed.test for 127.0.0.1: 1 query"),
        "{out}"
    );

    // TTL 1 s, grace 1 s: expired two seconds after the answer.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, out, _) = run(&[
        "why",
        "198.51.100.51",
        "--log",
        &log,
        "--policy",
        policy_arg,
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("no longer admitted") && out.contains("expired at"),
        "{out}"
    );

    let (code, out, _) = run(&["why", "192.0.2.99", "--log", &log]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("never resolved"), "{out}");
    let (code, out, _) = run(&["why", "198.51.100.50", "--client", "::1", "--log", &log]);
    assert_eq!(code, Some(1), "{out}");
}
