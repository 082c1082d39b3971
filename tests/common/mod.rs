//! Shared helpers for the integration tests: a scripted upstream, the real `dnsfence` binary
//! started on a free port, and a small DNS client over UDP and TCP.

#![allow(dead_code, unused_imports)]

pub mod lab;
pub mod netns;
pub mod tools;
pub mod upstream;
pub mod wire;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

pub use tools::require_tool;
pub use upstream::{Behaviour, Upstream, name};

pub const BIN: &str = env!("CARGO_BIN_EXE_dnsfence");

/// A running `dnsfence serve`, killed on drop.
pub struct Dnsfence {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log_path: PathBuf,
    child: Child,
}

/// A loopback port free for both UDP and TCP at the time of asking.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Dnsfence {
    /// Starts dnsfence with `policy_yaml` (its `listen` is overridden) and waits until it answers.
    pub fn start(policy_yaml: &str) -> Dnsfence {
        Dnsfence::start_with_args(policy_yaml, &[])
    }

    /// Like [`Dnsfence::start`], with more arguments for `serve`.
    pub fn start_with_args(policy_yaml: &str, args: &[&str]) -> Dnsfence {
        let mut dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, policy_yaml).unwrap();
        let mut log_path = dir.path().join("queries.jsonl");
        // The free port may be taken by another test between the check and dnsfence's bind:
        // then dnsfence exits, and it is started again on another port.
        for _ in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let child = Command::new(BIN)
                .args(["serve", "--policy"])
                .arg(&policy)
                .args(["--listen", &addr.to_string(), "--log"])
                .arg(&log_path)
                .args(args)
                .stdin(Stdio::null())
                .spawn()
                .expect("start dnsfence");
            let mut fence = Dnsfence {
                addr,
                dir,
                log_path,
                child,
            };
            if fence.wait_ready() {
                return fence;
            }
            dir = std::mem::replace(&mut fence.dir, tempfile::tempdir().unwrap());
            log_path = fence.log_path.clone();
        }
        panic!("dnsfence did not start (see its stderr above)");
    }

    /// Waits until this dnsfence (not another test's on the same port) listens on its TCP
    /// port, which it binds after its UDP port; false if it exited first.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if listens_on(self.child.id(), self.addr.port()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "dnsfence did not start listening on {} within 30 s",
            self.addr
        );
    }

    pub fn udp(&self, qname: &str, qtype: RecordType) -> Message {
        query_udp(self.addr, &query(qname, qtype)).expect("udp reply")
    }

    pub fn tcp(&self, qname: &str, qtype: RecordType) -> Message {
        query_tcp(self.addr, &query(qname, qtype)).expect("tcp reply")
    }

    pub fn both(&self, qname: &str, qtype: RecordType) -> [Message; 2] {
        [self.udp(qname, qtype), self.tcp(qname, qtype)]
    }

    /// The query log, one parsed JSON object per line, waiting for at least `at_least` lines.
    pub fn log(&self, at_least: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = read_log(&self.log_path);
            if lines.len() >= at_least || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server process still exists and is not a zombie (it has not exited or
    /// crashed). Reads `/proc`, so it needs no `&mut`.
    pub fn alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            // The state is the first field after the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// The server's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn stop(&mut self) {
        // A signal, not `kill(1)`: one program fewer for a fresh machine to miss.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Dnsfence {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` holds a TCP socket listening on `port` (from /proc: the listening
/// socket's inode among the process's file descriptors).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let port_hex = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1, state field 3 (0A: LISTEN), inode field 9.
            if fields.len() > 9 && fields[1].ends_with(&port_hex) && fields[3] == "0A" {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|inode| target.to_str() == Some(inode)))
}

pub fn read_log(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line still being written (no newline yet) is read next time.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}")))
        .collect()
}

/// A standard recursive query with EDNS (4096) for `qname`.
pub fn query(qname: &str, qtype: RecordType) -> Message {
    let mut message = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name(qname), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.set_edns(edns);
    message
}

pub fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x4242);
    NEXT.fetch_add(7919, Ordering::Relaxed)
}

pub fn query_udp(addr: SocketAddr, message: &Message) -> std::io::Result<Message> {
    query_udp_bytes(addr, &message.to_vec().unwrap())
        .and_then(|bytes| Message::from_vec(&bytes).map_err(std::io::Error::other))
}

pub fn query_udp_bytes(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(bytes, addr)?;
    let mut buf = vec![0u8; 65535];
    let (len, _) = socket.recv_from(&mut buf)?;
    buf.truncate(len);
    Ok(buf)
}

pub fn query_tcp(addr: SocketAddr, message: &Message) -> std::io::Result<Message> {
    query_tcp_bytes(addr, &message.to_vec().unwrap())
        .and_then(|bytes| Message::from_vec(&bytes).map_err(std::io::Error::other))
}

pub fn query_tcp_bytes(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// The A and AAAA addresses of an answer, as strings.
pub fn addresses(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// A policy with one upstream and the given allow rules (YAML list items).
pub fn policy(upstream: SocketAddr, allow: &[&str], extra: &str) -> String {
    let rules: String = allow.iter().map(|r| format!("  - \"{r}\"\n")).collect();
    format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"{upstream}\"]\nupstream_timeout: 1s\nallow:\n{rules}firewall:\n  enabled: false\n{extra}"
    )
}

/// The names of `n` as they appear in a log or an answer (`Name::to_string`).
/// `dnsfence serve` on the shared test policy ([`policy`]) with `upstream`.
pub fn fence_with(upstream: &Upstream, allow: &[&str], extra: &str) -> Dnsfence {
    Dnsfence::start(&policy(upstream.addr, allow, extra))
}

/// A socket address from an address and a port.
pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Log lines for one name (compared as the log prints it, case-insensitively).
pub fn log_for<'a>(log: &'a [serde_json::Value], qname: &str) -> Vec<&'a serde_json::Value> {
    let want = fqdn(qname);
    log.iter()
        .filter(|l| {
            l["qname"]
                .as_str()
                .is_some_and(|q| q.eq_ignore_ascii_case(&want))
        })
        .collect()
}

pub fn fqdn(n: &str) -> String {
    name(n).to_string()
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Tests that need root skip outside CI, and fail in CI (a silent skip would hide a hole).
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root and CI is set: refusing to skip");
    }
    eprintln!("skipping {test}: needs root");
    false
}

pub fn _unused(_: Name) {}
