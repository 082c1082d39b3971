//! `firewall.contain.cgroups` in real namespaces and real cgroups: a process placed in the
//! contained cgroup reaches only what dnsfence admitted, a process in a sibling cgroup keeps
//! its egress (the control, through the same tool), and a contained cgroup deleted and
//! re-created (what `systemctl restart` does) is contained from its first packet.
//!
//! dnsfence runs in the lab's gateway namespace under `nsenter --net` rather than `ip netns
//! exec`, which mounts a fresh `/sys` and so hides the cgroup2 mount; the probes are started
//! the same way and move themselves into their cgroup (`echo $$ > cgroup.procs`) before they
//! open a socket: the socket's cgroup is fixed when it is created.

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lab::{LabPolicy, output_text};
use common::netns::*;
use common::{BIN, require_root, require_tool};
use hickory_proto::rr::RecordType;

const ADMITTED: &str = "198.51.100.10:80";
const NOT_ADMITTED: &str = "198.51.100.20:80";

/// The cgroup2 mount, found as dnsfence finds it.
fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
        })
        .collect();
    mounts
        .iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup"))
        .or_else(|| mounts.first())
        .cloned()
        .expect("this test needs a cgroup2 mount")
}

/// A private cgroup subtree for one test, removed on drop (children first).
struct Cgroups {
    root: PathBuf,
    base: String,
}

impl Cgroups {
    fn new(tag: &str) -> Cgroups {
        let root = cgroup2_root();
        let base = format!("dnsf-{tag}-{}", std::process::id());
        std::fs::create_dir(root.join(&base)).unwrap();
        Cgroups { root, base }
    }

    /// The path of `leaf` as the policy names it (relative to the cgroup2 root).
    fn rel(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.base)
    }

    fn dir(&self, leaf: &str) -> PathBuf {
        self.root.join(self.rel(leaf))
    }

    fn create(&self, leaf: &str) {
        std::fs::create_dir(self.dir(leaf)).unwrap();
    }

    /// Deletes an (empty) cgroup; waits for its last process to be reaped.
    fn delete(&self, leaf: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(self.dir(leaf)) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("rmdir {leaf}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.root.join(&self.base)) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(self.root.join(&self.base));
    }
}

/// `dnsfence serve` in the gateway's network namespace, with the host's mounts; killed on drop.
struct Fence {
    child: Child,
    stderr: PathBuf,
}

impl Fence {
    fn start(lab: &Lab, yaml: &str) -> Fence {
        require_tool("nsenter");
        std::fs::write(lab.policy_path(), yaml).unwrap();
        let stderr = lab.stderr_path();
        let file = std::fs::File::create(&stderr).unwrap();
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", lab.gw.path().display()))
            .arg("--")
            .arg(BIN)
            .args(["serve", "--policy"])
            .arg(lab.policy_path())
            .arg("--log")
            .arg(lab.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        // SAFETY: one prctl(2) between fork and exec: async-signal-safe, no allocation.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut fence = Fence {
            child: command.spawn().expect("start dnsfence"),
            stderr,
        };
        let socket = lab.control_socket();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = fence.child.try_wait() {
                panic!("dnsfence exited ({status}):\n{}", fence.said());
            }
            let ready = Command::new(BIN)
                .args(["ctl", "--socket"])
                .arg(&socket)
                .arg("ready")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return fence;
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", fence.said());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connect to `to` from a process in the gateway's namespace that first moved itself
/// into `cgroup` (a directory under the cgroup2 mount).
fn connect_from(lab: &Lab, cgroup: &Path, to: &str) -> Result<(), String> {
    for tool in ["nsenter", "bash", "timeout", "perl"] {
        require_tool(tool);
    }
    let script = format!(
        "use IO::Socket::INET; IO::Socket::INET->new(PeerAddr => '{to}', Timeout => 0.8) \
         or do {{ print \"failed: $!\\n\"; exit 1 }}; print \"connected\\n\";"
    );
    let procs = cgroup.join("cgroup.procs");
    let out: Output = Command::new("nsenter")
        .arg(format!("--net={}", lab.gw.path().display()))
        .args(["--", "bash", "-c"])
        .arg(
            "echo $$ > \"$1\" || { echo \"cannot join $1\"; exit 2; }; \
             exec timeout 5 perl -e \"$2\"",
        )
        .args(["probe"])
        .arg(&procs)
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .expect("nsenter");
    let said = output_text(&out);
    match out.status.code() {
        Some(0) => Ok(()),
        Some(2) => panic!("the probe could not join {}: {said}", cgroup.display()),
        _ => Err(said),
    }
}

fn policy(lab: &Lab, cgroup: &str) -> String {
    policy_with(lab, &[cgroup], "")
}

/// The test policy containing `cgroups`, with `firewall_extra` lines added to `firewall`.
fn policy_with(lab: &Lab, cgroups: &[&str], firewall_extra: &str) -> String {
    let cgroups: Vec<String> = cgroups.iter().map(|c| format!("\"{c}\"")).collect();
    LabPolicy::new(lab)
        .listen(&["127.0.0.1:53"])
        .allow(&["api.allowed.test"])
        .top("qtypes: [A, AAAA]\n")
        .control(lab, "  allow_uids: [0]\n")
        .firewall(&format!(
            "  hooks: [output]\n  set_size: 4096\n{firewall_extra}  contain:\n    cgroups: [{}]\n",
            cgroups.join(", ")
        ))
        .yaml()
}

/// Writes `yaml` as the policy and runs `ctl --json reload`: its exit status and JSON (or
/// what it printed).
fn reload(lab: &Lab, yaml: &str) -> (bool, serde_json::Value, String) {
    lab.write_policy(yaml);
    let out = lab.ctl(&["--json", "reload"]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.success(), json, output_text(&out))
}

/// Resolves `api.allowed.test` through dnsfence from inside the gateway (which admits it).
fn resolve_allowed(lab: &Lab) -> Vec<String> {
    let query = common::query("api.allowed.test", RecordType::A);
    lab.gw.run(move || {
        let reply = dns_udp(
            "127.0.0.1:53".parse().unwrap(),
            &query,
            Duration::from_secs(3),
        )
        .expect("dnsfence answers");
        reply.answers.iter().map(|r| r.data.to_string()).collect()
    })
}

#[test]
fn a_contained_cgroup_reaches_only_admitted_addresses_and_stays_contained_when_re_created() {
    if !require_root(
        "a_contained_cgroup_reaches_only_admitted_addresses_and_stays_contained_when_re_created",
    ) {
        return;
    }
    let lab = Lab::new("cgrp");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let cg = Cgroups::new("cg");
    cg.create("agent");
    cg.create("other");
    let fence = Fence::start(&lab, &policy(&lab, &cg.rel("agent")));
    assert_eq!(resolve_allowed(&lab), ["198.51.100.10"]);

    // The contained cgroup reaches what dnsfence handed out, and nothing else.
    assert_eq!(connect_from(&lab, &cg.dir("agent"), ADMITTED), Ok(()));
    assert!(
        connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err(),
        "a process in the contained cgroup reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    // A sibling cgroup (another service on the host) keeps its egress: same tool, same address.
    assert_eq!(
        connect_from(&lab, &cg.dir("other"), NOT_ADMITTED),
        Ok(()),
        "a cgroup outside the contained one must keep its egress\n{}",
        lab.ruleset()
    );

    // A sibling created after start is handed back to the host within a poll or two.
    cg.create("late");
    let started = Instant::now();
    loop {
        if connect_from(&lab, &cg.dir("late"), NOT_ADMITTED).is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a cgroup created beside the contained one never got its egress back\n{}",
            lab.ruleset()
        );
    }
    eprintln!(
        "a new sibling cgroup got its egress back after {:?}",
        started.elapsed()
    );

    // Delete the contained cgroup (the service stopped): dnsfence says so, and the rest of
    // the host is untouched (the gate did not become "accept everything" nor "drop everything").
    cg.delete("agent");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !fence.said().contains("no such cgroup") {
        assert!(
            Instant::now() < deadline,
            "dnsfence did not say the contained cgroup is gone:\n{}",
            fence.said()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(connect_from(&lab, &cg.dir("other"), NOT_ADMITTED), Ok(()));

    // Re-created (new id): contained from its first connection, and still after several polls.
    cg.create("agent");
    assert!(
        connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err(),
        "a process in the re-created cgroup reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    assert_eq!(connect_from(&lab, &cg.dir("agent"), ADMITTED), Ok(()));
    std::thread::sleep(dnsfence::firewall::CGROUP_POLL * 3);
    assert!(
        connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err(),
        "the re-created cgroup was handed to the host by a later poll\n{}",
        lab.ruleset()
    );
    assert_eq!(connect_from(&lab, &cg.dir("other"), NOT_ADMITTED), Ok(()));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !fence.said().contains("exists now") {
        assert!(
            Instant::now() < deadline,
            "dnsfence did not say the contained cgroup is back:\n{}",
            fence.said()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(fence);
}

#[test]
fn check_and_serve_both_warn_about_a_missing_cgroup_and_serve_contains_it_once_created() {
    if !require_root(
        "check_and_serve_both_warn_about_a_missing_cgroup_and_serve_contains_it_once_created",
    ) {
        return;
    }
    let lab = Lab::new("cgmiss");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let cg = Cgroups::new("cgm");
    cg.create("other");
    let yaml = policy(&lab, &cg.rel("agent"));
    std::fs::write(lab.policy_path(), &yaml).unwrap();
    let check = Command::new(BIN)
        .args(["check", "--policy"])
        .arg(lab.policy_path())
        .output()
        .unwrap();
    let check_said = String::from_utf8_lossy(&check.stderr).to_string();
    assert!(check.status.success(), "check refused: {check_said}");
    assert!(check_said.contains("no such cgroup"), "{check_said}");

    let fence = Fence::start(&lab, &yaml);
    assert!(fence.said().contains("no such cgroup"), "{}", fence.said());
    assert_eq!(resolve_allowed(&lab), ["198.51.100.10"]);
    assert_eq!(connect_from(&lab, &cg.dir("other"), NOT_ADMITTED), Ok(()));
    // Created after start (the service starts after dnsfence): contained at once.
    cg.create("agent");
    assert!(
        connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err(),
        "a contained cgroup created after start reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    assert_eq!(connect_from(&lab, &cg.dir("agent"), ADMITTED), Ok(()));
    drop(fence);
}

#[test]
fn a_reload_that_adds_a_cgroup_contains_it_from_its_next_packet_and_one_that_removes_it_releases_it()
 {
    if !require_root(
        "a_reload_that_adds_a_cgroup_contains_it_from_its_next_packet_and_one_that_removes_it_releases_it",
    ) {
        return;
    }
    let lab = Lab::new("cgrel");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let cg = Cgroups::new("cgr");
    for leaf in ["agent", "added", "other", "nest", "nest/inner"] {
        cg.create(leaf);
    }
    let (agent, added, inner) = (cg.rel("agent"), cg.rel("added"), cg.rel("nest/inner"));
    let fence = Fence::start(&lab, &policy_with(&lab, &[&agent], ""));
    assert_eq!(resolve_allowed(&lab), ["198.51.100.10"]);
    // The controls: before the reload, the cgroups it will contain keep their egress.
    for leaf in ["added", "nest/inner"] {
        assert_eq!(
            connect_from(&lab, &cg.dir(leaf), NOT_ADMITTED),
            Ok(()),
            "{leaf} is not contained yet\n{}",
            lab.ruleset()
        );
    }
    assert!(connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err());

    // Same depth as `agent`: the table's layout is the same, only the cgroup sets change.
    let (ok, json, said) = reload(&lab, &policy_with(&lab, &[&agent, &added], ""));
    assert!(ok, "reload refused: {said}\n{}", fence.said());
    assert_eq!(json["ruleset"]["replaced"], false, "{json}");
    assert!(
        connect_from(&lab, &cg.dir("added"), NOT_ADMITTED).is_err(),
        "a cgroup the reload contains reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    // Contained, not cut off: what dnsfence admitted before the reload is carried over.
    assert_eq!(connect_from(&lab, &cg.dir("added"), ADMITTED), Ok(()));
    assert_eq!(connect_from(&lab, &cg.dir("other"), NOT_ADMITTED), Ok(()));

    // Deeper: a new level, so a new table (replaced in one transaction with its cgroup sets).
    let (ok, json, said) = reload(&lab, &policy_with(&lab, &[&agent, &added, &inner], ""));
    assert!(ok, "reload refused: {said}\n{}", fence.said());
    assert_eq!(json["ruleset"]["replaced"], true, "{json}");
    assert!(
        connect_from(&lab, &cg.dir("nest/inner"), NOT_ADMITTED).is_err(),
        "a deeper cgroup the reload contains reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    assert_eq!(connect_from(&lab, &cg.dir("nest/inner"), ADMITTED), Ok(()));
    // The watch follows the new paths: later polls neither hand the new cgroups back to the
    // host nor take a sibling away from it, and a sibling created now beside a newly contained
    // cgroup is listed (handed back) like one beside the first.
    cg.create("nest/late");
    let started = Instant::now();
    while connect_from(&lab, &cg.dir("nest/late"), NOT_ADMITTED).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the watch does not list the cgroups beside a path a reload added\n{}",
            lab.ruleset()
        );
    }
    std::thread::sleep(dnsfence::firewall::CGROUP_POLL * 3);
    for leaf in ["agent", "added", "nest/inner"] {
        assert!(
            connect_from(&lab, &cg.dir(leaf), NOT_ADMITTED).is_err(),
            "{leaf} was handed to the host by a poll after the reload\n{}",
            lab.ruleset()
        );
    }
    assert_eq!(connect_from(&lab, &cg.dir("other"), NOT_ADMITTED), Ok(()));

    // Removed again: released from the next packet, and still after several polls.
    let (ok, json, said) = reload(&lab, &policy_with(&lab, &[&agent], ""));
    assert!(ok, "reload refused: {said}\n{}", fence.said());
    assert_eq!(json["ruleset"]["replaced"], true, "{json}");
    for leaf in ["added", "nest/inner"] {
        assert_eq!(
            connect_from(&lab, &cg.dir(leaf), NOT_ADMITTED),
            Ok(()),
            "{leaf}: released by the reload\n{}",
            lab.ruleset()
        );
    }
    std::thread::sleep(dnsfence::firewall::CGROUP_POLL * 3);
    assert_eq!(connect_from(&lab, &cg.dir("added"), NOT_ADMITTED), Ok(()));
    assert!(connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err());

    // A reload refused whole (firewall.mark needs a restart) applies none of its cgroups: the old
    // gate stays, and the watch keeps listing the old paths.
    let before = lab.table_text();
    let (ok, _, said) = reload(&lab, &policy_with(&lab, &[&agent, &added], "  mark: 7\n"));
    assert!(!ok, "a reload changing firewall.mark was applied: {said}");
    assert!(said.contains("firewall.mark changed"), "{said}");
    assert_eq!(connect_from(&lab, &cg.dir("added"), NOT_ADMITTED), Ok(()));
    cg.create("late");
    let started = Instant::now();
    while connect_from(&lab, &cg.dir("late"), NOT_ADMITTED).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the watch stopped after a refused reload\n{}",
            lab.ruleset()
        );
    }
    std::thread::sleep(dnsfence::firewall::CGROUP_POLL * 3);
    assert_eq!(connect_from(&lab, &cg.dir("added"), NOT_ADMITTED), Ok(()));
    assert!(connect_from(&lab, &cg.dir("agent"), NOT_ADMITTED).is_err());
    assert_eq!(
        lab.table_text(),
        before,
        "a refused reload changed the ruleset"
    );
    drop(fence);
}

/// `check` and `serve` read the host for `contain.interfaces` too: an entry naming a bridge
/// port never matches (routed traffic enters on the bridge), so both warn, naming the bridge.
#[test]
fn check_warns_when_an_interface_entry_names_a_bridge_port() {
    if !require_root("check_warns_when_an_interface_entry_names_a_bridge_port") {
        return;
    }
    let ns = Netns::create(&format!("dnsf-brport-{}", std::process::id()));
    ns.ip(&["link", "add", "br-agents", "type", "bridge"]);
    ns.ip(&[
        "link", "add", "vport0", "type", "veth", "peer", "name", "vpeer0",
    ]);
    ns.ip(&["link", "set", "vport0", "master", "br-agents"]);
    let dir = tempfile::tempdir().unwrap();
    let check = |interfaces: &str| -> String {
        let path = dir.path().join("policy.yaml");
        std::fs::write(
            &path,
            format!(
                "listen: [\"10.77.0.1:53\"]\nupstreams: [\"192.0.2.53:53\"]\nallow: [a.test]\n\
                 firewall:\n  hooks: [forward]\n  contain: {{interfaces: [{interfaces}]}}\n"
            ),
        )
        .unwrap();
        // `ip netns exec` mounts the namespace's own /sys/class/net: what serve there sees.
        let out = ns.exec(
            Duration::from_secs(10),
            &[BIN, "check", "--policy", path.to_str().unwrap()],
        );
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "check refused: {said}");
        said
    };
    let said = check("vport0");
    assert!(
        said.contains("\"vport0\" is vport0, a port of the bridge \"br-agents\"")
            && said.contains("name the bridge (br-agents) instead"),
        "{said}"
    );
    let said = check("\"vport*\"");
    assert!(said.contains("matches vport0"), "{said}");
    // The control: the bridge itself, and an interface on its own, draw no such warning.
    let said = check("br-agents, vpeer0");
    assert!(!said.contains("a port of the bridge"), "{said}");
}
