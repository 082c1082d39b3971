//! The command line: `check` reports precise errors, `explain` agrees with `serve`.

mod common;

use std::process::Command;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_policies() {
    for file in ["policy/default.yaml", "policy/research-agent.yaml"] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let (code, stdout, stderr) = run(&["check", "--policy", &path]);
        assert_eq!(code, 0, "{file}: {stdout}{stderr}");
        assert!(stdout.contains("valid"), "{stdout}");
    }
}

#[test]
fn check_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"127.0.0.1:53\"]\nallow:\n  - ok.example.com\n  - \"**\"\n  - \"*.com\"\n  - a..b.example\nqtypes: [A, BOGUS]\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["check", "--policy", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    for line in [5, 6, 7, 8] {
        let needle = format!("broken.yaml:{line}:");
        assert!(stderr.contains(&needle), "missing {needle} in:\n{stderr}");
    }
}

#[test]
fn check_rejects_unknown_keys_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(
        &path,
        "upstreams: [\"127.0.0.1:53\"]\nallow: [a.example.com]\nalow: [b.example.com]\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["check", "--policy", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("typo.yaml:3:"), "{stderr}");
    assert!(stderr.contains("alow"), "{stderr}");
}

#[test]
fn explain_agrees_with_serve() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    upstream.a("x.wild.allowed.test", "198.51.100.11", 300);
    let yaml = policy(
        upstream.addr,
        &["api.allowed.test", "*.wild.allowed.test"],
        "qtypes: [A, AAAA]\n",
    );
    let fence = Dnsfence::start(&yaml);
    let policy_path = fence.dir.path().join("policy.yaml");
    let cases = [
        ("api.allowed.test", RecordType::A),
        ("api.allowed.test", RecordType::TXT),
        ("x.wild.allowed.test", RecordType::A),
        ("wild.allowed.test", RecordType::A),
        ("evil.test", RecordType::A),
        ("localhost", RecordType::A),
        ("1.0.0.127.in-addr.arpa", RecordType::PTR),
    ];
    for (i, (qname, qtype)) in cases.iter().enumerate() {
        let reply = fence.udp(qname, *qtype);
        let (code, stdout, stderr) = run(&[
            "explain",
            "--policy",
            policy_path.to_str().unwrap(),
            qname,
            &qtype.to_string(),
        ]);
        let log = fence.log(i + 1);
        let served = log
            .iter()
            .find(|l| l["qname"] == fqdn(qname) && l["qtype"] == qtype.to_string())
            .unwrap_or_else(|| panic!("{qname} {qtype} not in the log: {log:?}"));
        let explained = if code == 0 { "allow" } else { "deny" };
        assert_eq!(
            served["decision"], explained,
            "{qname} {qtype}: {stdout}{stderr}"
        );
        assert!(stdout.starts_with(explained), "{stdout}");
        if let Some(reason) = served["reason"].as_str() {
            assert!(
                stdout.contains(reason),
                "{qname}: log says {reason}, explain says {stdout}"
            );
        }
        if explained == "deny" {
            assert_ne!(reply.metadata.response_code, ResponseCode::NoError);
        }
    }
}

#[test]
fn check_warns_about_wildcards_over_suffixes_anyone_can_register_under() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.yaml");
    std::fs::write(
        &path,
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"127.0.0.1:53\"]\nallow:\n  - api.github.com\n  - \"*.github.io\"\n  - \"**.s3.amazonaws.com\"\nfirewall: {enabled: false}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["check", "--policy", path.to_str().unwrap()]);
    assert_eq!(code, 0, "warnings do not fail the check: {stdout}{stderr}");
    for line in [5, 6] {
        let needle = format!("tenants.yaml:{line}:");
        assert!(
            stderr.contains(&needle),
            "missing warning {needle} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("tenants.yaml:4:"), "{stderr}");
}

#[test]
fn check_and_serve_refuse_wildcards_over_icann_public_suffixes_and_warn_about_private_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("suffixes.yaml");
    std::fs::write(
        &path,
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"127.0.0.1:53\"]\nallow:\n  - \"*.example.co.uk\"\n  - \"*.co.uk\"\n  - \"**.com.au\"\nfirewall: {enabled: false}\n",
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let (code, stdout, stderr) = run(&["check", "--policy", file]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    for needle in [
        "suffixes.yaml:5:5: \"*.co.uk\" would allow every name under the public suffix \"co.uk\"",
        "such as \"*.example.co.uk\"",
        "suffixes.yaml:6:5: \"**.com.au\" would allow every name under the public suffix \"com.au\"",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("suffixes.yaml:4:"), "{stderr}");
    // serve reads the same file the same way: refused, with the same message, nothing bound.
    let out = Command::new(BIN)
        .args(["serve", "--policy", file])
        .output()
        .unwrap();
    let serve_err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{serve_err}");
    assert!(
        serve_err.contains(
            "suffixes.yaml:5:5: \"*.co.uk\" would allow every name under the public suffix"
        ),
        "{serve_err}"
    );
    // Without the ICANN rules the private-section wildcard is only a warning.
    let ok = dir.path().join("tenant.yaml");
    std::fs::write(
        &ok,
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"127.0.0.1:53\"]\nallow:\n  - \"*.example.co.uk\"\n  - \"**.wixsite.com\"\nfirewall: {enabled: false}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["check", "--policy", ok.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("tenant.yaml:5:5: \"**.wixsite.com\" allows names under \"wixsite.com\""),
        "{stderr}"
    );
}

#[test]
fn every_subcommand_has_help_with_examples() {
    for sub in ["serve", "check", "explain", "ruleset"] {
        let (code, stdout, _) = run(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub}");
        assert!(
            stdout.contains("Examples:"),
            "{sub} --help has no examples:\n{stdout}"
        );
        assert!(stdout.contains("--policy"), "{sub}");
    }
}

#[test]
fn ruleset_prints_a_script_nft_accepts() {
    let path = format!("{}/policy/research-agent.yaml", env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = run(&["ruleset", "--policy", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("table inet dnsfence"), "{stdout}");
    assert!(stdout.contains("policy drop"), "{stdout}");
    // `nft -c` checks the script without applying it (needs root and nft).
    if !require_root("ruleset_prints_a_script_nft_accepts") {
        return;
    }
    common::require_tool("nft");
    let mut child = Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft is installed (apt-get install nftables)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdout.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
