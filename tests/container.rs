//! The container image and the contained-agent compose pattern (`docker/`), run for real.
//!
//! The test builds `docker/Dockerfile` without pulling anything (local base images from
//! `docker/local-images.sh`, the crates vendored into the build context), then brings up
//! `docker/compose.yaml` with a test override on a private, internal Docker network:
//!
//! ```text
//!            ┌── netns of dnsfence (shared) ───────────┐  internal network 198.18.N.0/24
//!            │ dnsfence 127.0.0.1:53   output chain    │── .2
//!            │ agent (busybox, no capabilities)        │
//!            └─────────────────────────────────────────┘
//!   upstream .5 (scripted, records every query)   resolver .6 (another DNS server)
//!   allowed target .10 (TCP 80 echo)              unnamed target .11 (TCP 80 echo)
//!   probe .20 (busybox, not behind dnsfence: proves every target is up)
//! ```
//!
//! The upstream, the second resolver and the targets are this test's own Rust services
//! (`tests/common`), bound inside the containers' network namespaces from a thread that entered
//! them, so every "must not reach" check can look at what really arrived. Each one has a "can
//! reach" control through the same tool: from the agent for the allowed name, from the probe
//! container for the rest (including Docker's embedded DNS at 127.0.0.11).
//!
//! Needs root and a running Docker engine (`.ci/run` installs `docker.io` and `docker-compose`
//! and starts `dockerd`); under `CI` a missing engine is a failure, never a skip.

mod common;

use std::borrow::BorrowMut;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::Upstream;
use common::netns::Services;
use common::tools::require_tool;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The programs this file runs (each in `tests/common/tools.rs` with its Debian package).
const TOOLS: &[&str] = &[
    "docker",
    "docker-compose",
    "debootstrap",
    "busybox",
    "file",
    "bash",
    "cp",
];

/// Root, the tools and a running engine: `false` (skip) only outside CI.
fn engine_ready(test: &str) -> bool {
    if !common::require_root(test) {
        return false;
    }
    for tool in TOOLS {
        require_tool(tool);
    }
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
        .expect("run docker info");
    if !info.status.success() {
        let message = format!(
            "{test}: the Docker engine is not running ({}): start it with `dockerd &` \
             (.ci/run does) and retry",
            String::from_utf8_lossy(&info.stderr).trim()
        );
        let message = format!(
            "{message} (the engine is the Debian package docker.io; .ci/install-test-deps installs \
             and starts it)"
        );
        if std::env::var_os("CI").is_some() {
            panic!("{message}; CI is set: refusing to skip");
        }
        eprintln!("skipping {message}");
        return false;
    }
    true
}

/// Runs a command and returns its output; panics when it cannot start.
fn run(mut command: impl BorrowMut<Command>) -> Output {
    let command = command.borrow_mut();
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok(mut command: impl BorrowMut<Command>) -> String {
    let command = command.borrow_mut();
    let out = run(&mut *command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> Command {
    require_tool("docker");
    let mut command = Command::new("docker");
    command.args(args);
    command
}

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

/// The images this test runs. Dropping it (also when a check failed) removes what the build
/// left on the machine: dnsfence's image and BuildKit's cache (the release target directory
/// alone is about a gigabyte). The local base images stay: they are built once per machine.
/// `DNSFENCE_KEEP_DOCKER_CACHE=1` keeps both, for quick reruns while working on `docker/`.
struct Images {
    dnsfence: String,
    busybox: String,
    _build_lock: File,
}

impl Drop for Images {
    fn drop(&mut self) {
        if std::env::var_os("DNSFENCE_KEEP_DOCKER_CACHE").is_some() {
            eprintln!(
                "DNSFENCE_KEEP_DOCKER_CACHE: keeping {} and the build cache",
                self.dnsfence
            );
            return;
        }
        let _ = run(docker(&["image", "rm", "-f", &self.dnsfence]));
        // Our builds are the only BuildKit builds the tests make; the build lock, still held,
        // keeps another checkout's build from running meanwhile.
        let pruned = run(Command::new(build_client()).args(["builder", "prune", "-af"]));
        eprintln!(
            "removed {} and the build cache: {}",
            self.dnsfence,
            String::from_utf8_lossy(&pruned.stdout).trim()
        );
    }
}

/// Builds the local base images (once per machine) and dnsfence's image.
fn build_images() -> Images {
    // One build at a time on this machine, held until the images are removed again: test runs
    // of other checkouts wait here.
    let lock = File::create(std::env::temp_dir().join("dnsfence-docker-build.lock"))
        .expect("create the build lock");
    lock.lock().expect("take the build lock");
    let script = Path::new(REPO).join("docker/local-images.sh");
    let started = Instant::now();
    require_tool("bash");
    run_ok(Command::new("bash").arg(&script));
    let printed = run_ok(Command::new("bash").arg(&script).arg("--print"));
    let value = |key: &str| {
        printed
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("local-images.sh --print has no {key}: {printed}"))
            .to_owned()
    };
    let builder = value("BUILDER_IMAGE=");
    let busybox = value("BUSYBOX_IMAGE=");
    eprintln!(
        "local base images ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let context = build_context();
    // One tag per checkout: several checkouts on one machine build side by side.
    let tag = format!("dnsfence-local/dnsfence:test-{:08x}", fnv(REPO.as_bytes()));
    let started = Instant::now();
    let out = run(Command::new(build_client())
        .args([
            "build",
            "--progress=plain",
            "-f",
            "docker/Dockerfile",
            "--build-arg",
            &format!("BUILDER_IMAGE={builder}"),
            "--build-arg",
            "RUNTIME_IMAGE=scratch",
            "-t",
            &tag,
            ".",
        ])
        .current_dir(&context)
        .env("DOCKER_BUILDKIT", "1"));
    assert!(
        out.status.success(),
        "docker build failed:\n{}\n{}",
        tail(&out.stdout, 60),
        tail(&out.stderr, 30)
    );
    eprintln!(
        "docker build of {tag} took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Images {
        dnsfence: tag,
        busybox,
        _build_lock: lock,
    }
}

/// The client that builds the image with the engine's BuildKit: Debian's docker.io client
/// (version-matched to the engine it ships) where it is installed; a newer client that comes
/// first on PATH needs the buildx plugin for BuildKit, which Debian 12 does not package.
fn build_client() -> &'static str {
    require_tool("docker");
    if Path::new("/usr/bin/docker").is_file() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// The build context: the sources the Dockerfile copies, and the crates vendored into
/// `docker/deps/vendor` (kept between runs while Cargo.lock is unchanged).
fn build_context() -> PathBuf {
    let context = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-context");
    let vendor = context.join("docker/deps/vendor");
    let lock = std::fs::read(Path::new(REPO).join("Cargo.lock")).expect("read Cargo.lock");
    let stamp = context.join("vendor.stamp");
    let want = format!("{:016x}", fnv(&lock));
    let vendored = std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && vendor.is_dir();
    let kept = std::env::temp_dir().join(format!("dnsfence-vendor-{}", std::process::id()));
    if vendored {
        std::fs::rename(&vendor, &kept).expect("keep the vendored crates aside");
    }
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(context.join("docker")).expect("create the build context");
    for part in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "policy",
        "benches",
        "docker",
    ] {
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(Path::new(REPO).join(part))
                .arg(&context),
        );
    }
    let _ = std::fs::remove_dir_all(&vendor);
    if vendored {
        std::fs::rename(&kept, &vendor).expect("put the vendored crates back");
    } else {
        let started = Instant::now();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let out = run(Command::new(cargo)
            .args(["vendor", "--locked", "--quiet"])
            .arg(&vendor)
            .current_dir(REPO));
        assert!(
            out.status.success(),
            "cargo vendor failed: {}",
            tail(&out.stderr, 20)
        );
        std::fs::write(&stamp, &want).expect("write the vendor stamp");
        eprintln!("cargo vendor took {:.1} s", started.elapsed().as_secs_f64());
    }
    context
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One test, so that the image is built once and removed (with its build cache) at its end.
#[test]
fn image_is_minimal_and_the_contained_agent_reaches_only_what_dnsfence_resolved() {
    if !engine_ready("image_is_minimal_and_the_contained_agent_reaches_only_what_dnsfence_resolved")
    {
        return;
    }
    let started = Instant::now();
    let images = build_images();
    image_holds_a_static_binary_and_the_policies_and_nothing_else(&images);
    contained_agent_reaches_only_what_dnsfence_resolved(&images);
    eprintln!(
        "container test (build, image checks, compose pattern) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn image_holds_a_static_binary_and_the_policies_and_nothing_else(images: &Images) {
    let config = run_ok(docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Config.User}} {{.Size}}",
        &images.dnsfence,
    ]));
    let mut parts = config.split_whitespace();
    assert_eq!(parts.next(), Some(r#"["/dnsfence"]"#), "{config}");
    assert_eq!(
        parts.next(),
        Some(r#"["serve","--policy","/etc/dnsfence/policy.yaml"]"#),
        "{config}"
    );
    assert_eq!(parts.next(), Some("0:0"), "{config}");
    let size: u64 = parts.next().and_then(|s| s.parse().ok()).expect("size");
    eprintln!(
        "image {} is {:.1} MiB",
        images.dnsfence,
        size as f64 / 1048576.0
    );
    assert!(size < 32 << 20, "the image is {size} bytes");

    // Every file of the image: the binary, the policies, the control socket's directory.
    let container = run_ok(docker(&["create", &images.dnsfence]));
    let container = container.trim();
    let export = run(docker(&["export", container]));
    run_ok(docker(&["rm", container]));
    assert!(export.status.success());
    let files = tar_list(&export.stdout);
    let mut unexpected: Vec<&String> = files
        .iter()
        .filter(|f| {
            let f = f.trim_end_matches('/');
            !(f == "dnsfence"
                || f == "etc"
                || f == "run"
                || f == "run/dnsfence"
                || f == "etc/dnsfence"
                || (f.starts_with("etc/dnsfence/") && f.ends_with(".yaml"))
                // Docker's own mount points, created in every container.
                || ["dev", "proc", "sys", "etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab", ".dockerenv"]
                    .iter()
                    .any(|d| f == *d || f.starts_with(&format!("{d}/"))))
        })
        .collect();
    unexpected.sort();
    assert!(unexpected.is_empty(), "unexpected files: {unexpected:?}");
    assert!(files.iter().any(|f| f == "etc/dnsfence/policy.yaml"));
    assert!(files.iter().any(|f| f == "etc/dnsfence/default.yaml"));

    // Static: it runs in an image without a C library, and says so itself.
    let version = run_ok(docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        &images.dnsfence,
        "--version",
    ]));
    assert!(version.starts_with("dnsfence "), "{version}");
    let check = run_ok(docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        &images.dnsfence,
        "check",
        "--policy",
        "/etc/dnsfence/policy.yaml",
    ]));
    assert!(check.contains("valid"), "{check}");
}

/// The member names of a tar archive (ustar headers only; enough for `docker export`).
fn tar_list(bytes: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() {
        let header = &bytes[at..at + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |from: usize, len: usize| {
            let raw = &header[from..from + len];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(len);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let name = field(0, 100);
        let prefix = field(345, 155);
        let size = u64::from_str_radix(field(124, 12).trim(), 8).unwrap_or(0) as usize;
        let typeflag = header[156];
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if typeflag != b'x' && typeflag != b'g' {
            names.push(full.trim_start_matches("./").to_owned());
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The compose pattern
// ---------------------------------------------------------------------------------------------

/// A compose project brought up by this test, taken down (with its network) on drop.
struct Project {
    name: String,
    override_file: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Command {
        require_tool("docker-compose");
        let mut command = Command::new("docker-compose");
        command
            .arg("--no-ansi")
            .args(["-p", &self.name])
            .arg("-f")
            .arg(Path::new(REPO).join("docker/compose.yaml"))
            .arg("-f")
            .arg(&self.override_file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    fn container(&self, service: &str) -> String {
        let id = run_ok(&mut self.compose(&["ps", "-q", service]));
        let id = id.trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    fn pid(&self, service: &str) -> u32 {
        let id = self.container(service);
        run_ok(docker(&["inspect", "--format", "{{.State.Pid}}", &id]))
            .trim()
            .parse()
            .expect("container pid")
    }

    /// Runs a shell command in a service's container, killed after `limit`.
    fn exec(&self, service: &str, limit: Duration, script: &str) -> Output {
        let id = self.container(service);
        let secs = limit.as_secs().max(1).to_string();
        run(docker(&["exec", &id, "timeout", &secs, "sh", "-c", script]))
    }

    fn logs(&self, service: &str) -> String {
        let out = run(&mut self.compose(&["logs", "--no-color", service]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = run(&mut self.compose(&["down", "-v", "-t", "1"]));
    }
}

/// Runs `f` on a thread inside the network namespace of process `pid` (a container).
fn in_netns_of<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/proc/{pid}/ns/net");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn policy_yaml(net: &str, upstream: &str, allow: &[&str]) -> String {
    let rules: String = allow.iter().map(|r| format!("  - {r}\n")).collect();
    format!(
        "listen: [\"127.0.0.1:53\"]\n\
         upstreams: [\"{upstream}:53\"]\n\
         upstream_timeout: 2s\n\
         allow:\n{rules}\
         allow_answers: [\"{net}.0/24\"]\n\
         log: \"-\"\n\
         ttl: {{min: 30s, max: 300s, grace: 5s}}\n\
         firewall:\n  enabled: true\n  hooks: [output]\n"
    )
}

fn override_yaml(images: &Images, net: &str) -> String {
    let busybox = &images.busybox;
    let sleeper = |ip: &str| {
        format!(
            "    image: {busybox}\n    command: [\"sleep\", \"3600\"]\n    networks:\n      fence:\n        ipv4_address: {net}.{ip}\n"
        )
    };
    // dnsfence keeps the compose file's healthcheck (`dnsfence ctl ready`): the agent starts
    // only once it passes.
    format!(
        "services:\n\
         \x20 dnsfence:\n\
         \x20   networks:\n      fence:\n        ipv4_address: {net}.2\n\
         \x20 agent:\n    image: {busybox}\n    command: [\"sleep\", \"3600\"]\n\
         \x20 upstream:\n{}\
         \x20 resolver:\n{}\
         \x20 allowed-target:\n{}\
         \x20 unnamed-target:\n{}\
         \x20 probe:\n{}\
         networks:\n  fence:\n    internal: true\n    ipam:\n      config:\n        - subnet: {net}.0/24\n",
        sleeper("5"),
        sleeper("6"),
        sleeper("10"),
        sleeper("11"),
        sleeper("20"),
    )
}

/// Output of a command as one string, stdout then stderr.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A busybox `nslookup` for an A record, through `server` (the resolv.conf one when `None`).
fn nslookup(name: &str, server: Option<&str>) -> String {
    format!(
        "nslookup -type=a -timeout=2 -retry=1 {name} {}",
        server.unwrap_or("")
    )
}

/// Sends a line over TCP with busybox `nc` and prints what comes back.
fn echo_to(addr: &str, line: &str) -> String {
    format!("echo {line} | nc -w 3 {addr} 80")
}

/// Brings the project up on a free subnet of 198.18.0.0/15 (benchmarking addresses, never
/// routed: the network is `internal` anyway).
fn bring_up(images: &Images, dir: &Path, allow: &[&str]) -> (Project, String) {
    let started = Instant::now();
    for attempt in 0..8u32 {
        let n = (std::process::id() + attempt * 37) % 200 + 20;
        let net = format!("198.18.{n}");
        std::fs::write(
            dir.join("policy.yaml"),
            policy_yaml(&net, &format!("{net}.5"), allow),
        )
        .expect("write the policy");
        let override_file = dir.join(format!("override-{attempt}.yaml"));
        std::fs::write(&override_file, override_yaml(images, &net)).expect("write the override");
        let project = Project {
            name: format!("dnsfencetest{}x{attempt}", std::process::id()),
            override_file,
            env: vec![
                ("DNSFENCE_IMAGE".into(), images.dnsfence.clone()),
                ("DNSFENCE_POLICY_DIR".into(), dir.display().to_string()),
                ("DNSFENCE_POLICY".into(), "policy.yaml".into()),
            ],
            _dir: tempfile::tempdir().expect("tempdir"),
        };
        let out = run(&mut project.compose(&["up", "-d", "--no-build"]));
        if out.status.success() {
            eprintln!(
                "compose up on {net}.0/24 took {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return (project, net);
        }
        let message = text(&out);
        if message.contains("overlap") {
            continue; // another run holds that subnet: drop this project, try the next one
        }
        panic!(
            "docker-compose up failed:\n{message}\n--- dnsfence:\n{}",
            project.logs("dnsfence")
        );
    }
    panic!("no free 198.18.N.0/24 subnet for the test network");
}

fn contained_agent_reaches_only_what_dnsfence_resolved(images: &Images) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (project, net) = bring_up(images, dir.path(), &["allowed.agent-corp.net"]);
    let fence = format!("{net}.2");
    let target = format!("{net}.10");
    let unnamed = format!("{net}.11");
    let long = Duration::from_secs(10);

    // The scripted upstream (.5), another resolver (.6) and the targets, inside their containers.
    let zone = {
        let target = target.clone();
        let unnamed = unnamed.clone();
        move |u: &Upstream| {
            u.a("allowed.agent-corp.net", &target, 60);
            u.a("second.agent-corp.net", &target, 60);
            u.a("denied.agent-corp.net", &unnamed, 60);
        }
    };
    let upstream = {
        let (zone, addr) = (zone.clone(), format!("{net}.5:53"));
        in_netns_of(project.pid("upstream"), move || {
            let u = Upstream::start_at(addr.parse::<SocketAddr>().expect("addr"));
            zone(&u);
            u
        })
    };
    let resolver = {
        let addr = format!("{net}.6:53");
        in_netns_of(project.pid("resolver"), move || {
            let u = Upstream::start_at(addr.parse::<SocketAddr>().expect("addr"));
            zone(&u);
            u
        })
    };
    let allowed_target = in_netns_of(project.pid("allowed-target"), || {
        Services::start(&[80], &[])
    });
    let unnamed_target = in_netns_of(project.pid("unnamed-target"), || {
        Services::start(&[80], &[])
    });
    let from_fence = |q: &common::upstream::SeenQuery| q.peer.ip().to_string() == fence;

    // The agent has no capabilities at all (no NET_RAW, no NET_ADMIN) and no control socket.
    let caps = text(&project.exec(
        "agent",
        long,
        "grep -E '^Cap(Prm|Eff|Bnd|Amb)' /proc/self/status",
    ));
    assert_eq!(caps.lines().count(), 4, "{caps}");
    for line in caps.lines() {
        assert!(
            line.ends_with("0000000000000000"),
            "the agent holds capabilities: {caps}"
        );
    }
    let run_dir = text(&project.exec("agent", long, "ls -A /run/dnsfence 2>&1; echo end"));
    assert!(
        !run_dir.contains("control.sock"),
        "the agent sees the control socket: {run_dir}"
    );

    // Allowed: resolved through dnsfence, then reachable.
    let out = project.exec("agent", long, &nslookup("allowed.agent-corp.net", None));
    assert!(
        out.status.success() && text(&out).contains(&target),
        "the agent cannot resolve an allowed name: {}\n--- dnsfence:\n{}",
        text(&out),
        project.logs("dnsfence")
    );
    let out = project.exec("agent", long, &echo_to(&target, "allowed-ok"));
    assert!(
        text(&out).contains("allowed-ok"),
        "the agent cannot reach the allowed name's address: {}",
        text(&out)
    );
    assert!(!allowed_target.hits().is_empty());

    // Denied: NXDOMAIN, and the upstream never heard of it.
    let out = project.exec("agent", long, &nslookup("denied.agent-corp.net", None));
    assert!(
        !out.status.success() && text(&out).contains("NXDOMAIN") && !text(&out).contains(&unnamed),
        "a denied name resolved: {}",
        text(&out)
    );
    assert!(
        upstream.seen_for("denied.agent-corp.net").is_empty(),
        "a denied name was forwarded"
    );

    // A hard-coded address: dropped. Control: the probe container (not behind dnsfence) reaches it.
    let out = project.exec("agent", long, &echo_to(&unnamed, "unnamed-leak"));
    assert!(
        !text(&out).contains("unnamed-leak"),
        "the agent reached a hard-coded address"
    );
    assert!(
        unnamed_target.hits().is_empty(),
        "{:?}",
        unnamed_target.hits()
    );
    let out = project.exec("probe", long, &echo_to(&unnamed, "probe-ok"));
    assert!(
        text(&out).contains("probe-ok"),
        "control: the probe cannot reach .11: {}",
        text(&out)
    );

    // Docker's embedded DNS at 127.0.0.11: useless to the agent. Control: it answers the probe.
    let out = project.exec("probe", long, &nslookup("upstream", Some("127.0.0.11")));
    assert!(
        text(&out).contains(&format!("{net}.5")),
        "control: Docker's DNS does not answer the probe: {}",
        text(&out)
    );
    for name in ["upstream", "allowed.agent-corp.net"] {
        let out = project.exec("agent", long, &nslookup(name, Some("127.0.0.11")));
        assert!(
            !out.status.success() && !text(&out).contains(&net),
            "the agent resolved {name} through Docker's DNS at 127.0.0.11: {}",
            text(&out)
        );
    }

    // Another resolver, and the upstream itself: unreachable. Controls from the probe.
    let out = project.exec(
        "agent",
        long,
        &nslookup("allowed.agent-corp.net", Some(&format!("{net}.6"))),
    );
    assert!(
        !text(&out).contains(&target),
        "the agent used another resolver: {}",
        text(&out)
    );
    assert!(
        !resolver.seen().iter().any(from_fence),
        "another resolver heard from the agent"
    );
    let out = project.exec(
        "agent",
        long,
        &nslookup("denied.agent-corp.net", Some(&format!("{net}.5"))),
    );
    assert!(
        !text(&out).contains(&unnamed),
        "the agent asked the upstream directly: {}",
        text(&out)
    );
    assert!(
        !upstream
            .seen_for("denied.agent-corp.net")
            .iter()
            .any(from_fence),
        "the upstream heard a denied name from dnsfence's namespace"
    );
    let out = project.exec(
        "probe",
        long,
        &nslookup("allowed.agent-corp.net", Some(&format!("{net}.6"))),
    );
    assert!(
        text(&out).contains(&target),
        "control: the probe cannot use .6: {}",
        text(&out)
    );
    let out = project.exec(
        "probe",
        long,
        &nslookup("denied.agent-corp.net", Some(&format!("{net}.5"))),
    );
    assert!(
        text(&out).contains(&unnamed),
        "control: the probe cannot use .5: {}",
        text(&out)
    );

    // `docker compose up` returned once the healthcheck (`dnsfence ctl ready`) passed: the
    // agent's container was started only after that.
    let health = run_ok(docker(&[
        "inspect",
        "--format",
        "{{.State.Health.Status}} {{index .Config.Healthcheck.Test 1}} {{index .Config.Healthcheck.Test 2}} {{index .Config.Healthcheck.Test 3}}",
        &project.container("dnsfence"),
    ]));
    assert_eq!(health.trim(), "healthy /dnsfence ctl ready", "{health}");

    reload_revokes(&project, dir.path(), &net, &allowed_target);

    // The query log is dnsfence's stdout: `docker compose logs dnsfence`.
    let logs = project.logs("dnsfence");
    assert!(
        logs.lines()
            .any(|l| l.contains("\"qname\":\"denied.agent-corp.net.\"")
                && l.contains("\"decision\":\"deny\"")
                && l.contains("\"reason\":\"policy\"")),
        "no query log line denying the name by policy:\n{logs}"
    );
}

/// SIGHUP with a changed policy revokes: allowed.agent-corp.net is gone (NXDOMAIN, its address
/// no longer reachable); second.agent-corp.net (same address) now resolves and reaches it.
fn reload_revokes(project: &Project, dir: &Path, net: &str, allowed_target: &Services) {
    let target = format!("{net}.10");
    let long = Duration::from_secs(10);
    // SIGHUP with a changed policy revokes: allowed.agent-corp.net is gone (NXDOMAIN, its address no
    // longer reachable), second.agent-corp.net (same address) now resolves and reaches it.
    let policy = dir.join("policy.yaml");
    let next = dir.join("policy.yaml.next");
    std::fs::write(
        &next,
        policy_yaml(net, &format!("{net}.5"), &["second.agent-corp.net"]),
    )
    .unwrap();
    std::fs::rename(&next, &policy).unwrap();
    run_ok(project.compose(&["kill", "-s", "HUP", "dnsfence"]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = project.exec("agent", long, &nslookup("allowed.agent-corp.net", None));
        if text(&out).contains("NXDOMAIN") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "allowed.agent-corp.net still resolves 15 s after SIGHUP: {}\n--- dnsfence:\n{}",
            text(&out),
            project.logs("dnsfence")
        );
        thread::sleep(Duration::from_millis(300));
    }
    let hits_before = allowed_target.hits().len();
    let out = project.exec("agent", long, &echo_to(&target, "revoked-leak"));
    assert!(
        !text(&out).contains("revoked-leak"),
        "the revoked address is still reachable after the reload"
    );
    assert_eq!(allowed_target.hits().len(), hits_before);
    let out = project.exec("agent", long, &nslookup("second.agent-corp.net", None));
    assert!(
        text(&out).contains(&target),
        "second.agent-corp.net after the reload: {}",
        text(&out)
    );
    let out = project.exec("agent", long, &echo_to(&target, "second-ok"));
    assert!(
        text(&out).contains("second-ok"),
        "control after the reload: {}",
        text(&out)
    );
}
