//! systemd's side of `Type=notify`, played by the test: it binds a Unix datagram socket, starts
//! `dnsfence serve` in a fresh network namespace with `NOTIFY_SOCKET` (and `WATCHDOG_USEC`)
//! pointing at it, and reads what dnsfence tells the service manager:
//!
//! - `READY=1` arrives only once the kernel holds dnsfence's table (checked with `nft` the
//!   moment the message is read) and the resolver answers; a dnsfence that cannot bind its
//!   listener never says it;
//! - `RELOADING=1` then `READY=1` around a SIGHUP reload;
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
    assert!(!reload.is_empty());
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
