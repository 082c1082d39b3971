//! Changing the policy while dnsfence runs, without a firewall: the control socket and
//! `dnsfence ctl`, reload (SIGHUP, `ctl reload`, `--watch`), invalid and restart-only reloads,
//! reload under load, temporary grants. Revocation in the kernel is in `revocation.rs`.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use common::{BIN, Upstream, addresses, free_port, listens_on, query, query_udp, read_log};

/// A `dnsfence serve` with its own control socket, policy file and query log.
struct Server {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    /// Extra lines of the `control:` section.
    control: String,
    child: Child,
}

impl Server {
    fn start(upstream: &Upstream, allow: &[&str], extra: &str, args: &[&str]) -> Server {
        Server::start_with(upstream, allow, extra, "", args)
    }

    fn start_with(
        upstream: &Upstream,
        allow: &[&str],
        extra: &str,
        control: &str,
        args: &[&str],
    ) -> Server {
        // The free port may be taken by another test before dnsfence binds it: then it exits
        // and is started again on another.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            // Other uids must reach the socket inside (the refusal test).
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let policy = dir.path().join("policy.yaml");
            let child = Command::new("true").spawn().unwrap();
            let mut server = Server {
                dir,
                addr,
                control: control.to_owned(),
                child,
            };
            server.write_policy(upstream, allow, extra);
            server.child = Command::new(BIN)
                .args(["serve", "--policy"])
                .arg(&policy)
                .arg("--log")
                .arg(server.log_path())
                .args(args)
                .stdin(Stdio::null())
                .spawn()
                .expect("start dnsfence");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                if listens_on(server.child.id(), addr.port()) && server.socket().exists() {
                    return server;
                }
                assert!(Instant::now() < deadline, "dnsfence did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("dnsfence did not start (see its stderr above)");
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("queries.jsonl")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    fn policy_text(&self, upstream: &Upstream, allow: &[&str], extra: &str) -> String {
        let rules: String = allow.iter().map(|r| format!("  - \"{r}\"\n")).collect();
        format!(
            "listen: [\"{}\"]\nupstreams: [\"{}\"]\nupstream_timeout: 1s\nallow:\n{rules}\
             firewall:\n  enabled: false\ncontrol:\n  socket: \"{}\"\n{}{extra}",
            self.addr,
            upstream.addr,
            self.socket().display(),
            self.control,
        )
    }

    /// Replaces the policy file the way editors do: a new file renamed over the old one.
    fn write_policy(&self, upstream: &Upstream, allow: &[&str], extra: &str) {
        self.write_raw(&self.policy_text(upstream, allow, extra));
    }

    fn write_raw(&self, text: &str) {
        let tmp = self.dir.path().join(".policy.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.policy_path()).unwrap();
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run dnsfence ctl")
    }

    fn sighup(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    fn rcode(&self, qname: &str) -> ResponseCode {
        query_udp(self.addr, &query(qname, RecordType::A))
            .expect("reply")
            .metadata
            .response_code
    }

    fn log(&self) -> Vec<serde_json::Value> {
        read_log(&self.log_path())
    }

    /// Waits for a log line that `pred` accepts.
    fn wait_log(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.log().into_iter().find(|l| pred(l)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line {what}: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends raw bytes to the socket and returns what came back.
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn ctl_reports_status_and_readiness_and_the_socket_speaks_plain_http() {
    let upstream = Upstream::start();
    let server = Server::start(&upstream, &["a.allowed.test"], "", &[]);
    let ready = server.ctl(&["ready"]);
    assert_eq!(code(&ready), 0, "{}", text(&ready));
    let status = server.ctl(&["--json", "status"]);
    assert_eq!(code(&status), 0, "{}", text(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["ready"]["ready"], true);
    assert_eq!(status["ready"]["firewall"], "disabled");
    let digest = status["policy"]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 64);

    // What curl sends.
    let answer = raw(
        &server.socket(),
        b"GET /v1/ready HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("\"ready\": true"), "{answer}");

    // Every query line names the policy that decided it.
    upstream.a("a.allowed.test", "198.51.100.1", 300);
    assert_eq!(server.rcode("a.allowed.test"), ResponseCode::NoError);
    let line = server.wait_log("for a.allowed.test", |l| l["qname"] == "a.allowed.test.");
    assert_eq!(line["policy"].as_str().unwrap(), &digest[..12]);
}

#[test]
fn the_socket_answers_garbage_with_400_and_keeps_serving() {
    let upstream = Upstream::start();
    upstream.a("a.allowed.test", "198.51.100.1", 300);
    let server = Server::start(&upstream, &["a.allowed.test"], "", &[]);
    let garbage: [&[u8]; 6] = [
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET /v1/status\r\n\r\n",
        b"POST /v1/grants HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope",
        b"POST /v1/grants HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        b"GET /v1/nothing-here HTTP/1.1\r\n\r\n",
        b"PUT /v1/reload HTTP/1.1\r\n\r\n",
    ];
    let expected = ["400", "400", "400", "413", "404", "405"];
    for (bytes, status) in garbage.iter().zip(expected) {
        let answer = raw(&server.socket(), bytes);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{bytes:?} -> {answer}"
        );
    }
    // A header that never ends: refused at the size bound.
    let answer = raw(&server.socket(), &vec![b'a'; 64 * 1024]);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // A client that connects and says nothing is dropped after the time bound; meanwhile the
    // socket serves others.
    let silent = UnixStream::connect(server.socket()).unwrap();
    let status = server.ctl(&["status"]);
    assert_eq!(code(&status), 0, "{}", text(&status));
    drop(silent);
    assert_eq!(server.rcode("a.allowed.test"), ResponseCode::NoError);
}

#[test]
fn ctl_exits_2_when_the_socket_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ctl", "--socket"])
        .arg(dir.path().join("nobody.sock"))
        .arg("ready")
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("cannot connect"), "{}", text(&out));
}

#[test]
fn sighup_applies_a_removed_name_at_once_without_reaching_the_upstream() {
    let upstream = Upstream::start();
    upstream.a("a.allowed.test", "198.51.100.1", 300);
    upstream.a("b.allowed.test", "198.51.100.2", 300);
    let server = Server::start(&upstream, &["a.allowed.test", "b.allowed.test"], "", &[]);
    assert_eq!(server.rcode("b.allowed.test"), ResponseCode::NoError);
    server.write_policy(&upstream, &["a.allowed.test"], "");
    server.sighup();
    let reload = server.wait_log("reload ok", |l| l["event"] == "reload");
    assert_eq!(reload["result"], "ok", "{reload}");
    assert_eq!(reload["trigger"], "sighup");
    let digest = reload["policy"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 64);
    upstream.clear_seen();
    assert_eq!(server.rcode("b.allowed.test"), ResponseCode::NXDomain);
    assert!(upstream.seen_for("b.allowed.test").is_empty());
    // Control: the name still allowed still reaches the upstream (its answer is cached, so
    // ask for a type not asked before).
    let aaaa = query_udp(server.addr, &query("a.allowed.test", RecordType::AAAA)).unwrap();
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert_eq!(upstream.seen_for("a.allowed.test").len(), 1);
    let denied = server.wait_log("b denied", |l| {
        l["qname"] == "b.allowed.test." && l["decision"] == "deny"
    });
    assert_eq!(denied["policy"].as_str().unwrap(), &digest[..12]);
}

#[test]
fn an_invalid_policy_is_refused_with_positions_and_the_old_one_keeps_serving() {
    let upstream = Upstream::start();
    upstream.a("a.allowed.test", "198.51.100.1", 300);
    let server = Server::start(&upstream, &["a.allowed.test"], "", &[]);
    let good = server.policy_text(&upstream, &["a.allowed.test"], "");
    server.write_raw(&format!("{good}deny_with: silence\nqtypes: [A, BOGUS]\n"));
    let out = server.ctl(&["reload"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let policy = server.policy_path().display().to_string();
    let lines = text(&out);
    for position in [format!("{policy}:10:12:"), format!("{policy}:11:13:")] {
        assert!(lines.contains(&position), "{position} missing in {lines}");
    }
    assert_eq!(server.rcode("a.allowed.test"), ResponseCode::NoError);
    let event = server.wait_log("reload invalid", |l| l["event"] == "reload");
    assert_eq!(event["result"], "invalid");
    assert_eq!(event["errors"].as_array().unwrap().len(), 2, "{event}");

    // A key that needs a restart is refused whole, even beside a change that could apply.
    server.write_raw(
        &server
            .policy_text(&upstream, &["b.allowed.test"], "")
            .replace("upstream_timeout: 1s", "upstream_timeout: 2s"),
    );
    let out = server.ctl(&["reload"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        text(&out).contains("upstream_timeout changed"),
        "{}",
        text(&out)
    );
    assert_eq!(server.rcode("a.allowed.test"), ResponseCode::NoError);
    assert_eq!(server.rcode("b.allowed.test"), ResponseCode::NXDomain);

    // A valid one then applies.
    server.write_policy(&upstream, &["b.allowed.test"], "");
    upstream.a("b.allowed.test", "198.51.100.2", 300);
    let out = server.ctl(&["reload"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(server.rcode("b.allowed.test"), ResponseCode::NoError);
    assert_eq!(server.rcode("a.allowed.test"), ResponseCode::NXDomain);
}

#[test]
fn watch_picks_up_an_added_name_within_two_seconds() {
    let upstream = Upstream::start();
    upstream.a("new.allowed.test", "198.51.100.3", 300);
    let server = Server::start(&upstream, &["a.allowed.test"], "", &["--watch"]);
    assert_eq!(server.rcode("new.allowed.test"), ResponseCode::NXDomain);
    server.write_policy(&upstream, &["a.allowed.test", "new.allowed.test"], "");
    let written = Instant::now();
    while server.rcode("new.allowed.test") != ResponseCode::NoError {
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "not allowed 2 s after the file changed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let event = server.wait_log("reload by watch", |l| l["event"] == "reload");
    assert_eq!(event["trigger"], "watch");

    // A ConfigMap-style swap: the file is a symlink whose target directory is replaced.
    let data = server.dir.path().join("..data-2");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("policy.yaml"),
        server.policy_text(&upstream, &["a.allowed.test"], ""),
    )
    .unwrap();
    let link = server.dir.path().join(".policy.link");
    std::os::unix::fs::symlink(data.join("policy.yaml"), &link).unwrap();
    std::fs::rename(&link, server.policy_path()).unwrap();
    let swapped = Instant::now();
    while server.rcode("new.allowed.test") != ResponseCode::NXDomain {
        assert!(
            swapped.elapsed() < Duration::from_secs(2),
            "symlink swap not seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_under_load_loses_no_query_and_answers_none_wrong() {
    let upstream = Upstream::start();
    upstream.a("steady.allowed.test", "198.51.100.7", 300);
    upstream.a("flip.allowed.test", "198.51.100.8", 300);
    let server = Server::start(
        &upstream,
        &["steady.allowed.test"],
        "limits:\n  client_qps: 0\n",
        &[],
    );
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            let answered = answered.clone();
            std::thread::spawn(move || {
                let mut wrong = Vec::new();
                // Bounded: at most 1,500 queries per worker, and stops with the reloads.
                for _ in 0..1500 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match query_udp(addr, &query("steady.allowed.test", RecordType::A)) {
                        Ok(reply)
                            if reply.metadata.response_code == ResponseCode::NoError
                                && addresses(&reply) == ["198.51.100.7"] =>
                        {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(reply) => wrong.push(format!("{:?}", reply.metadata.response_code)),
                        Err(e) => wrong.push(format!("no answer: {e}")),
                    }
                }
                wrong
            })
        })
        .collect();
    for round in 0..10 {
        let allow: &[&str] = if round % 2 == 0 {
            &["steady.allowed.test", "flip.allowed.test"]
        } else {
            &["steady.allowed.test"]
        };
        server.write_policy(&upstream, allow, "limits:\n  client_qps: 0\n");
        let out = server.ctl(&["reload"]);
        assert_eq!(code(&out), 0, "{}", text(&out));
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    let wrong: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(wrong.is_empty(), "{} wrong answers: {wrong:?}", wrong.len());
    assert!(answered.load(Ordering::Relaxed) > 100, "the load ran");
    // The writer flushes every few milliseconds: wait for the last lines.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reloads = server
            .log()
            .into_iter()
            .filter(|l| l["event"] == "reload" && l["result"] == "ok")
            .count();
        if reloads == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "{reloads} reload lines, not 10");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_grant_allows_a_name_until_it_ends_and_revoke_ends_one_early() {
    let upstream = Upstream::start();
    upstream.a("tmp.granted.test", "198.51.100.9", 300);
    upstream.a("other.granted.test", "198.51.100.10", 300);
    let server = Server::start(&upstream, &["a.allowed.test"], "", &[]);
    assert_eq!(server.rcode("tmp.granted.test"), ResponseCode::NXDomain);

    let out = server.ctl(&[
        "grant",
        "tmp.granted.test",
        "--ttl",
        "2s",
        "--reason",
        "pip install for step 3",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let granted = Instant::now();
    assert!(text(&out).starts_with("g"), "prints the id: {}", text(&out));
    assert_eq!(server.rcode("tmp.granted.test"), ResponseCode::NoError);
    let line = server.wait_log("allowed by the grant", |l| {
        l["qname"] == "tmp.granted.test." && l["decision"] == "allow"
    });
    assert!(line["grant"].as_str().unwrap().starts_with('g'), "{line}");
    let listed = server.ctl(&["grants"]);
    assert!(
        text(&listed).contains("tmp.granted.test"),
        "{}",
        text(&listed)
    );

    // After its end: denied locally, never forwarded.
    std::thread::sleep(Duration::from_millis(2050).saturating_sub(granted.elapsed()));
    upstream.clear_seen();
    assert_eq!(server.rcode("tmp.granted.test"), ResponseCode::NXDomain);
    assert!(upstream.seen_for("tmp.granted.test").is_empty());
    let ended = server.wait_log("grant end", |l| l["event"] == "grant-end");
    assert_eq!(ended["cause"], "expired");
    let grant = server.wait_log("grant", |l| l["event"] == "grant");
    assert_eq!(grant["uid"], 0);
    assert!(grant["pid"].as_u64().is_some(), "{grant}");
    assert_eq!(grant["reason"], "pip install for step 3");

    // ctl revoke ends one early.
    let out = server.ctl(&[
        "grant",
        "other.granted.test",
        "--ttl",
        "10m",
        "--reason",
        "revoked early",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let id = text(&out).split_whitespace().next().unwrap().to_owned();
    assert_eq!(server.rcode("other.granted.test"), ResponseCode::NoError);
    let out = server.ctl(&["revoke", &id]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(server.rcode("other.granted.test"), ResponseCode::NXDomain);
    let out = server.ctl(&["revoke", &id]);
    assert_eq!(code(&out), 1, "already ended: {}", text(&out));
    let ended = server.wait_log("revoked", |l| {
        l["event"] == "grant-end" && l["cause"] == "revoked"
    });
    assert_eq!(ended["id"].as_str(), Some(id.as_str()));
}

#[test]
fn grants_follow_the_policy_grammar_and_limits() {
    let upstream = Upstream::start();
    let server = Server::start(
        &upstream,
        &["a.allowed.test"],
        "grants:\n  max_ttl: 1m\n  max_active: 1\n",
        &[],
    );
    let grant = |name: &str, ttl: &str, extra: &[&str]| {
        let mut args = vec!["grant", name, "--ttl", ttl, "--reason", "test"];
        args.extend_from_slice(extra);
        server.ctl(&args)
    };
    for (name, ttl, why) in [
        ("**.granted.test", "10s", "any depth"),
        ("*.github.io", "10s", "multi-tenant"),
        ("*", "10s", "grammar"),
        ("ok.granted.test", "2m", "max_ttl"),
        ("ok.granted.test", "soon", "ttl syntax"),
    ] {
        let out = grant(name, ttl, &[]);
        assert_eq!(code(&out), 1, "{why}: {}", text(&out));
    }
    let out = grant("ok.granted.test", "10s", &["--group", "nobody"]);
    assert_eq!(code(&out), 1, "unknown group: {}", text(&out));
    let out = grant("**.granted.test", "10s", &["--force"]);
    assert_eq!(code(&out), 0, "forced: {}", text(&out));
    let out = grant("ok.granted.test", "10s", &[]);
    assert_eq!(code(&out), 1, "max_active: {}", text(&out));
}

/// Runs `dnsfence ctl status` as `uid`, with a copy of the binary other uids can execute.
fn ctl_as(server: &Server, uid: &str) -> Output {
    let bin = server.dir.path().join("dnsfence");
    if !bin.exists() {
        std::fs::copy(BIN, &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    Command::new("setpriv")
        .args(["--reuid", uid, "--regid", uid, "--clear-groups"])
        .arg(&bin)
        .args(["ctl", "--socket"])
        .arg(server.socket())
        .arg("status")
        .output()
        .unwrap()
}

#[test]
fn the_socket_refuses_a_peer_whose_uid_is_not_allowed() {
    if !common::require_root("the_socket_refuses_a_peer_whose_uid_is_not_allowed") {
        return;
    }
    common::tools::require_tool("setpriv");
    let upstream = Upstream::start();
    // Root only: the socket file is 0600, another uid cannot even connect.
    let server = Server::start(&upstream, &["a.allowed.test"], "", &[]);
    let out = ctl_as(&server, "4243");
    assert_eq!(code(&out), 2, "{}", text(&out));
    drop(server);

    // Another uid allowed: the file opens to everyone and SO_PEERCRED decides.
    let server = Server::start_with(
        &upstream,
        &["a.allowed.test"],
        "",
        "  allow_uids: [0, 4242]\n",
        &[],
    );
    let refused = ctl_as(&server, "4243");
    assert_eq!(code(&refused), 1, "{}", text(&refused));
    assert!(text(&refused).contains("HTTP 403"), "{}", text(&refused));
    let allowed = ctl_as(&server, "4242");
    assert_eq!(code(&allowed), 0, "{}", text(&allowed));
    // Flooded with refused peers, the socket still serves allowed ones.
    for _ in 0..50 {
        let _ = ctl_as(&server, "4243");
    }
    assert_eq!(code(&server.ctl(&["ready"])), 0);
    // allow_uids changes live.
    server.write_policy(&upstream, &["a.allowed.test"], "");
    let mut server = server;
    server.control = "  allow_uids: [0]\n".into();
    server.write_policy(&upstream, &["a.allowed.test"], "");
    assert_eq!(code(&server.ctl(&["reload"])), 0);
    let refused = ctl_as(&server, "4242");
    assert_eq!(code(&refused), 1, "{}", text(&refused));
}
