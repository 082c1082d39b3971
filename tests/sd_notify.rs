//! systemd's side of `Type=notify`, played by the test: it binds a Unix datagram socket, starts
//! `dnsfence serve` in a fresh network namespace with `NOTIFY_SOCKET` (and `WATCHDOG_USEC`)
//! pointing at it, and reads what dnsfence tells the service manager:
//!
//! - `READY=1` arrives only once the kernel holds dnsfence's table (checked with `nft` the
//!   moment the message is read) and the resolver answers; a dnsfence that cannot bind its
//!   listener never says it;
//! - `RELOADING=1` (with `MONOTONIC_USEC=`) then `READY=1` around a reload, whichever
//!   triggered it: SIGHUP, `dnsfence ctl reload` (also a refused one) or `serve --watch`;
//! - `WATCHDOG=1` keep-alives when the watchdog is on;
//! - `STOPPING=1` on SIGTERM, before it exits.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::tools::require_tool;

/// The service manager's end: every datagram dnsfence sends, split into `KEY=VALUE` lines.
struct Manager {
    socket: UnixDatagram,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        Manager { socket }
    }

    /// The next message within `limit`, as its lines; `None` on timeout.
    fn next(&self, limit: Duration) -> Option<Vec<String>> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Reads messages until one holds `line`; returns every message read, that one last.
    /// Panics after `limit`.
    fn wait_for(&self, line: &str, limit: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(message) = self.next(deadline.saturating_duration_since(Instant::now())) {
                let found = message.iter().any(|l| l == line);
                seen.push(message);
                if found {
                    return seen;
                }
            }
        }
        panic!("no {line} within {limit:?}; got {seen:?}");
    }
}

fn policy(upstream: SocketAddr) -> String {
    format!(
        "listen: [\"127.0.0.1:53\"]\n\
         upstreams: [\"{upstream}\"]\n\
         upstream_timeout: 1s\n\
         allow: [ok.test]\n\
         log: \"-\"\n\
         firewall:\n  enabled: true\n  hooks: [output]\n"
    )
}

fn start(ns: &Netns, policy: &Path, notify: &Path, watchdog_usec: Option<u64>) -> Child {
    let mut command = ns.command(common::BIN);
    command
        .args(["serve", "--policy"])
        .arg(policy)
        .env("NOTIFY_SOCKET", notify)
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match watchdog_usec {
        Some(usec) => command.env("WATCHDOG_USEC", usec.to_string()),
        None => command.env_remove("WATCHDOG_USEC"),
    };
    command.spawn().expect("start dnsfence")
}

fn table_exists(ns: &Netns) -> bool {
    ns.exec(
        Duration::from_secs(5),
        &["nft", "list", "table", "inet", "dnsfence"],
    )
    .status
    .success()
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).expect("signal dnsfence");
}

#[test]
fn ready_only_after_the_table_is_in_the_kernel_then_reloading_watchdog_and_stopping() {
    if !common::require_root("ready_only_after_the_table_is_in_the_kernel") {
        return;
    }
    for tool in ["ip", "nft", "timeout"] {
        require_tool(tool);
    }
    let ns = Netns::create(&format!("dfn-{}", std::process::id()));
    let upstream = ns.run(|| {
        let u = common::Upstream::start_at("127.0.0.53:53".parse().unwrap());
        u.a("ok.test", "192.0.2.7", 60);
        u.a("more.test", "192.0.2.8", 60);
        u
    });
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, policy(upstream.addr)).unwrap();
    let notify = dir.path().join("notify.sock");
    let manager = Manager::bind(&notify);

    assert!(
        !table_exists(&ns),
        "control: no table before dnsfence starts"
    );
    let mut child = start(&ns, &policy_path, &notify, Some(400_000));
    let messages = manager.wait_for("READY=1", Duration::from_secs(20));
    // The moment READY=1 is read: the kernel already holds the table, and DNS is answered.
    assert!(
        table_exists(&ns),
        "READY=1 before the table was in the kernel"
    );
    let answer = ns.run(|| {
        common::query_udp(
            "127.0.0.1:53".parse().unwrap(),
            &common::query("ok.test", hickory_proto::rr::RecordType::A),
        )
    });
    assert!(
        answer.is_ok(),
        "READY=1 before the listener answered: {answer:?}"
    );
    eprintln!("before and with READY=1: {messages:?}");

    // The watchdog: WATCHDOG=1 at about half the interval (0.4 s here).
    let pings = manager.wait_for("WATCHDOG=1", Duration::from_secs(3));
    assert!(!pings.is_empty());

    // SIGHUP: RELOADING=1, then READY=1 once the new policy is in force: the name it adds is
    // answered the moment READY=1 is read (control: denied before the reload).
    let more = |ns: &Netns| {
        ns.run(|| {
            common::query_udp(
                "127.0.0.1:53".parse().unwrap(),
                &common::query("more.test", hickory_proto::rr::RecordType::A),
            )
            .expect("dnsfence answers")
        })
    };
    assert_eq!(
        common::addresses(&more(&ns)),
        Vec::<String>::new(),
        "control: more.test is denied before the reload"
    );
    std::fs::write(
        &policy_path,
        policy(upstream.addr).replace("allow: [ok.test]", "allow: [ok.test, more.test]"),
    )
    .unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    let reload = manager.wait_for("RELOADING=1", Duration::from_secs(10));
    assert!(monotonic_usec(&reload).is_some(), "{reload:?}");
    manager.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(
        common::addresses(&more(&ns)),
        ["192.0.2.8"],
        "READY=1 after the reload, before the new policy was in force"
    );

    // SIGTERM: STOPPING=1, then the process ends.
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    manager.wait_for("STOPPING=1", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "dnsfence did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `MONOTONIC_USEC=` of the last message (the one `wait_for` stopped at).
fn monotonic_usec(messages: &[Vec<String>]) -> Option<u64> {
    messages
        .last()?
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
}

#[test]
fn ctl_reload_and_watch_reloads_say_reloading_with_the_monotonic_time_then_ready() {
    if !common::require_root("ctl_reload_and_watch_reloads_say_reloading") {
        return;
    }
    for tool in ["ip", "nft", "timeout"] {
        require_tool(tool);
    }
    let ns = Netns::create(&format!("dfw-{}", std::process::id()));
    let upstream = ns.run(|| {
        let u = common::Upstream::start_at("127.0.0.53:53".parse().unwrap());
        u.a("ok.test", "192.0.2.7", 60);
        u.a("more.test", "192.0.2.8", 60);
        u.a("watched.test", "192.0.2.9", 60);
        u
    });
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let with_control = |allow: &str| {
        format!(
            "{}control:\n  socket: \"{}\"\n",
            policy(upstream.addr).replace("allow: [ok.test]", allow),
            socket.display()
        )
    };
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, with_control("allow: [ok.test]")).unwrap();
    let notify = dir.path().join("notify.sock");
    let manager = Manager::bind(&notify);
    let mut child = ns
        .command(common::BIN)
        .args(["serve", "--watch", "--policy"])
        .arg(&policy_path)
        .env("NOTIFY_SOCKET", &notify)
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start dnsfence");
    manager.wait_for("READY=1", Duration::from_secs(20));
    let answers = |ns: &Netns, name: &'static str| {
        ns.run(move || {
            common::query_udp(
                "127.0.0.1:53".parse().unwrap(),
                &common::query(name, hickory_proto::rr::RecordType::A),
            )
            .expect("dnsfence answers")
        })
    };
    let ctl_reload = || {
        std::process::Command::new(common::BIN)
            .args(["ctl", "--socket"])
            .arg(&socket)
            .arg("reload")
            .output()
            .unwrap()
    };
    assert!(
        common::addresses(&answers(&ns, "more.test")).is_empty(),
        "control: denied before"
    );

    // `ctl reload`. Written in place (same digest check for --watch, which may also notice
    // it): the first RELOADING=1 is followed by READY=1 with the name answered.
    let tmp = dir.path().join(".p");
    std::fs::write(&tmp, with_control("allow: [ok.test, more.test]")).unwrap();
    std::fs::rename(&tmp, &policy_path).unwrap();
    let asked = Instant::now();
    let out = ctl_reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = manager.wait_for("RELOADING=1", Duration::from_secs(10));
    let first_usec = monotonic_usec(&first).expect("MONOTONIC_USEC with RELOADING=1");
    manager.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(common::addresses(&answers(&ns, "more.test")), ["192.0.2.8"]);

    // A refused `ctl reload` (invalid file) brackets the same way and leaves the policy.
    std::thread::sleep(Duration::from_millis(1500));
    // Until quiet for longer than --watch's poll: its own reload of the same file is over.
    while manager.next(Duration::from_millis(1500)).is_some() {}
    let broken = format!(
        "{}bogus_key: 1\n",
        with_control("allow: [ok.test, more.test]")
    );
    std::fs::write(&tmp, broken).unwrap();
    std::fs::rename(&tmp, &policy_path).unwrap();
    let out = ctl_reload();
    assert_eq!(out.status.code(), Some(1));
    let refused = manager.wait_for("RELOADING=1", Duration::from_secs(10));
    let refused_usec = monotonic_usec(&refused).expect("MONOTONIC_USEC");
    // Microseconds of the monotonic clock: as far apart as the two reloads were.
    let apart = Duration::from_micros(refused_usec.saturating_sub(first_usec));
    let elapsed = asked.elapsed();
    assert!(
        refused_usec > first_usec && apart <= elapsed + Duration::from_secs(1),
        "MONOTONIC_USEC {first_usec} then {refused_usec}: {apart:?} apart, {elapsed:?} passed"
    );
    manager.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(common::addresses(&answers(&ns, "more.test")), ["192.0.2.8"]);

    // `--watch`: a changed file reloads by itself, with the same notifications.
    // Until quiet for longer than --watch's poll: its own reload of the same file is over.
    while manager.next(Duration::from_millis(1500)).is_some() {}
    std::fs::write(&tmp, with_control("allow: [ok.test, watched.test]")).unwrap();
    std::fs::rename(&tmp, &policy_path).unwrap();
    let watched = manager.wait_for("RELOADING=1", Duration::from_secs(10));
    assert!(monotonic_usec(&watched).is_some(), "{watched:?}");
    manager.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(
        common::addresses(&answers(&ns, "watched.test")),
        ["192.0.2.9"]
    );
    assert!(common::addresses(&answers(&ns, "more.test")).is_empty());

    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

#[test]
fn a_dnsfence_that_cannot_bind_its_listener_never_says_ready() {
    if !common::require_root("a_dnsfence_that_cannot_bind_its_listener_never_says_ready") {
        return;
    }
    require_tool("ip");
    let ns = Netns::create(&format!("dfb-{}", std::process::id()));
    // Someone else holds 127.0.0.1:53 (UDP) in that namespace.
    let squatter = ns.run(|| UdpSocket::bind("127.0.0.1:53").expect("bind the squatter"));
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, policy("127.0.0.53:53".parse().unwrap())).unwrap();
    let notify = dir.path().join("notify.sock");
    let manager = Manager::bind(&notify);
    let mut child = start(&ns, &policy_path, &notify, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dnsfence kept running without its listener"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut messages = Vec::new();
    while let Some(message) = manager.next(Duration::from_millis(200)) {
        messages.push(message);
    }
    assert!(
        !messages.iter().flatten().any(|l| l == "READY=1"),
        "READY=1 without a listener: {messages:?}"
    );
    drop(squatter);
}
