//! The deployment files, read and checked: the systemd unit (`systemd-analyze verify` and its
//! security score), the Kubernetes manifests and the compose file (what they grant, to whom,
//! and how readiness is probed). What these files describe is proven to contain in
//! `tests/container.rs` (the compose pattern, run for real), `tests/firewall_e2e.rs` (dnsfence
//! and an unprivileged process in one namespace with the `output` hook: the pod's shape) and
//! the sd_notify test in `tests/sd_notify.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn repo(path: &str) -> PathBuf {
    Path::new(REPO).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn require_systemd_analyze() {
    // Debian's `systemd` package; it works without systemd running as PID 1.
    common::tools::require_tool("systemd-analyze");
}

/// The unit with its binary path pointed at the binary under test (verify checks that the
/// executables exist).
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit =
        read("deploy/systemd/dnsfence.service").replace("/usr/local/bin/dnsfence", common::BIN);
    let path = dir.join("dnsfence.service");
    std::fs::write(&path, unit).expect("write the unit");
    path
}

fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_unit_passes_verify() {
    require_systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("dnsfence.service:"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn systemd_unit_security_exposure_is_at_most_2_0() {
    require_systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .stdin(Stdio::null())
        .env("SYSTEMD_COLORS", "0")
        .output()
        .expect("run systemd-analyze security");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no overall score in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("systemd-analyze security --offline=yes: {}", line.trim());
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{stdout}");
}

#[test]
fn systemd_unit_is_a_notify_service_with_only_two_capabilities() {
    let unit = read("deploy/systemd/dnsfence.service");
    let d = directives(&unit);
    let get = |key: &str| -> Vec<&str> {
        d.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("Before"), ["nss-lookup.target"]);
    assert!(
        get("ExecStartPre")
            .iter()
            .any(|v| v.contains("dnsfence check --policy /etc/dnsfence/"))
    );
    assert!(
        get("ExecStart")
            .iter()
            .any(|v| v.contains("dnsfence serve --policy /etc/dnsfence/"))
    );
    assert!(get("ExecReload").contains(&"/bin/kill -HUP $MAINPID"));
    assert_eq!(
        get("CapabilityBoundingSet"),
        ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(
        get("AmbientCapabilities"),
        ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(
        get("RestrictAddressFamilies"),
        ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    );
    assert_eq!(get("RuntimeDirectory"), ["dnsfence"]);
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    assert!(get("SystemCallFilter").contains(&"@system-service"));
    assert!(!get("WatchdogSec").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_pod_runs_dnsfence_as_a_native_sidecar_that_alone_holds_net_admin() {
    let pod = yaml("deploy/kubernetes/pod.yaml");
    assert_eq!(pod["kind"], "Pod");
    let spec = &pod["spec"];
    let inits = spec["initContainers"].as_array().expect("initContainers");
    assert_eq!(inits.len(), 1, "one init container: the dnsfence sidecar");
    let fence = &inits[0];
    assert_eq!(fence["name"], "dnsfence");
    // A native sidecar: an init container that keeps running; the agent waits for its startup
    // probe, which is `ctl ready` (the ruleset is installed and read back).
    assert_eq!(fence["restartPolicy"], "Always");
    assert_eq!(
        strings(&fence["startupProbe"]["exec"]["command"]),
        ["/dnsfence", "ctl", "ready"]
    );
    assert!(
        fence["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("dnsfence"))
    );
    let args = strings(&fence["args"]);
    assert_eq!(
        &args[..3],
        ["serve", "--policy", "/etc/dnsfence/policy.yaml"]
    );
    assert!(
        args.contains(&"--watch"),
        "the ConfigMap is picked up by --watch"
    );

    let sc = &fence["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["NET_ADMIN", "NET_BIND_SERVICE"]
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["privileged"], false);

    let agents = spec["containers"].as_array().expect("containers");
    assert!(!agents.is_empty());
    for agent in agents {
        let sc = &agent["securityContext"];
        let name = &agent["name"];
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{name} adds capabilities"
        );
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_ne!(sc["privileged"], true, "{name}");
        // The control socket's volume is dnsfence's alone.
        for mount in agent["volumeMounts"].as_array().into_iter().flatten() {
            assert_ne!(mount["name"], "control", "{name} mounts the control socket");
        }
    }
    let mounts = fence["volumeMounts"].as_array().expect("volumeMounts");
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "control" && m["mountPath"] == "/run/dnsfence")
    );
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "policy" && m["mountPath"] == "/etc/dnsfence")
    );

    // The pod's resolver is dnsfence on loopback, not the cluster DNS.
    assert_eq!(spec["dnsPolicy"], "None");
    assert_eq!(strings(&spec["dnsConfig"]["nameservers"]), ["127.0.0.1"]);
    assert_eq!(
        spec["hostNetwork"],
        Value::Null,
        "the pod has its own network namespace"
    );
    let volume = spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "policy"))
        .expect("policy volume");
    assert_eq!(volume["configMap"]["name"], "dnsfence-policy");
}

#[test]
fn kubernetes_configmap_policy_is_one_dnsfence_accepts() {
    let map = yaml("deploy/kubernetes/policy-configmap.yaml");
    assert_eq!(map["kind"], "ConfigMap");
    assert_eq!(map["metadata"]["name"], "dnsfence-policy");
    let policy = map["data"]["policy.yaml"]
        .as_str()
        .expect("data.policy.yaml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let out = Command::new(common::BIN)
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .expect("run dnsfence check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy: Value = serde_saphyr::from_str(policy).unwrap();
    assert_eq!(strings(&policy["listen"]), ["127.0.0.1:53"]);
    assert_eq!(policy["firewall"]["enabled"], true);
    assert_eq!(strings(&policy["firewall"]["hooks"]), ["output"]);
    assert_eq!(policy["log"], "-", "the query log goes to stdout");
}

// ---------------------------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------------------------

#[test]
fn compose_file_gives_the_agent_no_capability_and_dnsfence_only_two() {
    let compose = yaml("docker/compose.yaml");
    let fence = &compose["services"]["dnsfence"];
    assert_eq!(strings(&fence["cap_drop"]), ["ALL"]);
    assert_eq!(
        strings(&fence["cap_add"]),
        ["NET_ADMIN", "NET_BIND_SERVICE"]
    );
    assert_eq!(fence["read_only"], true);
    assert_eq!(strings(&fence["security_opt"]), ["no-new-privileges:true"]);
    assert_eq!(
        strings(&fence["healthcheck"]["test"]),
        ["CMD", "/dnsfence", "ctl", "ready"]
    );

    let agent = &compose["services"]["agent"];
    assert_eq!(agent["network_mode"], "service:dnsfence");
    assert_eq!(
        agent["depends_on"]["dnsfence"]["condition"],
        "service_healthy"
    );
    assert_eq!(strings(&agent["cap_drop"]), ["ALL"]);
    assert!(agent["cap_add"].is_null());
    assert_eq!(strings(&agent["security_opt"]), ["no-new-privileges:true"]);
    assert!(agent["privileged"].is_null() || agent["privileged"] == false);
    // Not root: root's sockets may answer connections from outside (the ruleset spares uid 0).
    let user = agent["user"].as_str().unwrap_or("");
    let (uid, gid) = user.split_once(':').unwrap_or((user, ""));
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0) && gid.parse::<u32>().is_ok_and(|g| g != 0),
        "the agent must run as a numeric non-root uid:gid, not {user:?}"
    );
    let volumes = strings(&agent["volumes"]);
    assert!(
        volumes.iter().all(|v| !v.contains("/run/dnsfence")),
        "the agent mounts the control socket: {volumes:?}"
    );
    assert!(volumes.iter().any(|v| v.ends_with(":/etc/resolv.conf:ro")));
    let resolv = read("docker/resolv.conf");
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(servers, ["127.0.0.1"]);

    let dockerfile = read("docker/Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"/dnsfence\"]"));
    assert!(dockerfile.contains("CMD [\"serve\", \"--policy\", \"/etc/dnsfence/policy.yaml\"]"));
    assert!(dockerfile.contains("--locked"));
}
