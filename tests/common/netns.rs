//! Real network namespaces for the firewall end-to-end tests.
//!
//! A [`Lab`] is one private little internet per test, four namespaces joined by veth pairs:
//!
//! ```text
//!  agent1 10.77.0.2 fd77::2 ──┐                        ┌── inet 192.0.2.2 2001:db8:ffff::2
//!                      (a1)   gw 10.77.0.1 fd77::1     │   lo: local 198.51.100.0/24, 203.0.113.0/24,
//!                             │  10.78.0.1 fd78::1     │       2001:db8:100::/64 (AnyIP)
//!  agent2 10.78.0.2 fd78::2 ──┘  192.0.2.1 2001:db8:ffff::1
//! ```
//!
//! `gw` forwards (IPv4 and IPv6) and runs `dnsfence` under `ip netns exec`; `inet` holds the
//! upstream DNS server (198.51.100.53:53), another DNS server (198.51.100.99:53 and
//! [2001:db8:100::99]:53) and echo services (TCP 80, 443 and 853 on every address of its AnyIP
//! ranges, UDP 443 on the addresses in [`UDP_SERVICES`]), all recording who reached them. Nothing
//! routes outside these namespaces: `inet` has no default route, and the namespaces have no link
//! to the host's own.
//!
//! Sockets are opened inside a namespace by a dedicated std thread that entered it
//! ([`Netns::run`]); a socket stays in its namespace whichever thread uses it later. Dropping a
//! [`Lab`] kills `dnsfence`, stops the services and deletes the namespaces (which removes the
//! veths and every nftables table inside), also when the test panicked.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use nix::sched::CloneFlags;

use super::tools::require_tool;
use super::upstream::Upstream;
use super::{BIN, query, read_log};

/// Prefix of every namespace this harness creates: `dfe-<pid>-<seq>-<role>`.
const PREFIX: &str = "dfe-";

/// How long a connection that should succeed may take. A dropped first SYN is retransmitted
/// after 1 s, so a connect that only succeeds on the retransmission fails this limit: that is
/// how "admitted before answered" is told from "admitted a moment after".
pub const CONNECT_OK: Duration = Duration::from_millis(800);

/// How long to wait before calling a connection attempt or a datagram blocked.
pub const BLOCKED_AFTER: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// One namespace
// ---------------------------------------------------------------------------------------------

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add <name>` and brings `lo` up.
    pub fn create(name: &str) -> Netns {
        sh("ip", &["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh std thread that entered this namespace, and returns its result (a
    /// panic in `f` is resumed here). Sockets `f` opens belong to the namespace for good.
    pub fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(f).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`run`](Self::run) without waiting: the thread is inside the namespace.
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        thread::Builder::new()
            .name(format!("ns:{}", self.name))
            .spawn(move || {
                enter(&path);
                f()
            })
            .expect("spawn a namespace thread")
    }

    /// `ip -n <name> <args>`; panics with ip's message when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// A command run as `ip netns exec <name> <program>`.
    pub fn command(&self, program: &str) -> Command {
        require_tool("ip");
        require_tool(program);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `argv` inside the namespace, killed after `limit` (coreutils `timeout`, exit 124).
    pub fn exec(&self, limit: Duration, argv: &[&str]) -> Output {
        let secs = format!("{:.1}", limit.as_secs_f64());
        let mut command = self.command("timeout");
        if let Some(program) = argv.first() {
            require_tool(program);
        }
        command.args(["-k", "1", &secs]).args(argv);
        command.stdin(Stdio::null());
        command
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {argv:?}: {e}", self.name))
    }

    /// Sets a sysctl of this namespace (`net.ipv4.ip_forward` style key).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || {
            std::fs::write(&path, &value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        });
    }

    /// Reads a sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> String {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(move || std::fs::read_to_string(&path).unwrap().trim().to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

/// Runs a host command that must succeed.
fn sh(program: &str, args: &[&str]) {
    require_tool(program);
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces a killed earlier run of these tests left behind: only names of this
/// harness's format whose process is gone and that are older than any test run.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(seq), Some(_role)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), seq.parse::<u32>()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > Duration::from_secs(15 * 60));
        if old {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probes (call them inside `Netns::run`)
// ---------------------------------------------------------------------------------------------

/// What became of a TCP connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    Connected,
    /// No answer at all within the limit: the SYN (or its SYN-ACK) was dropped.
    TimedOut,
    /// A RST came back: the SYN reached a host, so it passed every firewall on the way.
    Refused,
    /// An error that stops at the firewall (EPERM from a local output drop, an ICMP
    /// unreachable/prohibited from a reject, no route).
    Unreachable(String),
}

impl Reach {
    /// Blocked on the way: never reached the destination host.
    pub fn is_blocked(&self) -> bool {
        matches!(self, Reach::TimedOut | Reach::Unreachable(_))
    }
}

fn classify_connect(error: &io::Error) -> Reach {
    match error.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Reach::TimedOut,
        ErrorKind::ConnectionRefused => Reach::Refused,
        _ => Reach::Unreachable(error.to_string()),
    }
}

/// One TCP connection attempt within `limit`.
pub fn tcp_probe(addr: SocketAddr, limit: Duration) -> Reach {
    match TcpStream::connect_timeout(&addr, limit) {
        Ok(_) => Reach::Connected,
        Err(e) => classify_connect(&e),
    }
}

/// A TCP connection from the calling thread's namespace, with short I/O timeouts.
pub fn tcp_open(addr: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, limit)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `payload` on a connection to an echo service and reads it back.
pub fn echo(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    if back != payload {
        return Err(io::Error::other(format!(
            "echo returned {back:?} for {payload:?}"
        )));
    }
    Ok(())
}

/// What became of a datagram sent to a UDP service that answers every datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpReach {
    Replied,
    NoReply,
    /// The kernel refused to send it (EPERM from a local output drop).
    SendFailed(String),
    /// ICMP port unreachable: it reached a host.
    Refused,
    /// Another ICMP error came back (a reject on the way).
    Unreachable(String),
}

impl UdpReach {
    pub fn is_blocked(&self) -> bool {
        matches!(
            self,
            UdpReach::NoReply | UdpReach::SendFailed(_) | UdpReach::Unreachable(_)
        )
    }
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Sends one datagram to `addr` and waits `wait` for any reply, from a socket connected to it
/// (so ICMP errors are reported).
pub fn udp_probe(addr: SocketAddr, payload: &[u8], wait: Duration) -> UdpReach {
    let socket = UdpSocket::bind(unspecified_for(addr)).expect("bind probe socket");
    udp_probe_from(&socket, addr, payload, wait)
}

/// [`udp_probe`] from a socket the caller bound (e.g. to a chosen source port).
pub fn udp_probe_from(
    socket: &UdpSocket,
    addr: SocketAddr,
    payload: &[u8],
    wait: Duration,
) -> UdpReach {
    if let Err(e) = socket.connect(addr) {
        return UdpReach::SendFailed(e.to_string());
    }
    socket.set_read_timeout(Some(wait)).unwrap();
    if let Err(e) = socket.send(payload) {
        return UdpReach::SendFailed(e.to_string());
    }
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(_) => UdpReach::Replied,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            UdpReach::NoReply
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => UdpReach::Refused,
        Err(e) => UdpReach::Unreachable(e.to_string()),
    }
}

/// A DNS query over UDP from an unspecified local address (so it works from any namespace),
/// waiting `wait` for the reply with the query's ID.
pub fn dns_udp(server: SocketAddr, message: &Message, wait: Duration) -> io::Result<Message> {
    let socket = UdpSocket::bind(unspecified_for(server))?;
    dns_udp_from(&socket, server, message, wait)
}

/// [`dns_udp`] from a socket the caller bound.
pub fn dns_udp_from(
    socket: &UdpSocket,
    server: SocketAddr,
    message: &Message,
    wait: Duration,
) -> io::Result<Message> {
    let deadline = Instant::now() + wait;
    socket.send_to(&message.to_vec().map_err(io::Error::other)?, server)?;
    let mut buf = vec![0u8; 65535];
    for _ in 0..16 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        let (len, from) = socket.recv_from(&mut buf)?;
        if from != server {
            continue;
        }
        let reply = Message::from_vec(&buf[..len]).map_err(io::Error::other)?;
        if reply.metadata.id == message.metadata.id {
            return Ok(reply);
        }
    }
    Err(io::Error::new(ErrorKind::TimedOut, "no DNS reply"))
}

/// A DNS query over TCP, connect and reply each bounded by `limit`.
pub fn dns_tcp(server: SocketAddr, message: &Message, limit: Duration) -> io::Result<Message> {
    let mut stream = TcpStream::connect_timeout(&server, limit)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    let bytes = message.to_vec().map_err(io::Error::other)?;
    let mut framed = u16::try_from(bytes.len())
        .map_err(io::Error::other)?
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf)?;
    Message::from_vec(&buf).map_err(io::Error::other)
}

/// `addr` with an IPv4-mapped IPv6 address turned back into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

// ---------------------------------------------------------------------------------------------
// The "internet" services
// ---------------------------------------------------------------------------------------------

/// One connection accepted or datagram received by a [`Services`] listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub tcp: bool,
    /// The address and port that was reached.
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Echo services: TCP listeners on `[::]` (dual stack), which with AnyIP routes answer on every
/// address of the namespace's local ranges, and UDP sockets bound to given addresses (a
/// wildcard UDP socket would answer from the wrong source address). Every connection and
/// datagram is recorded.
pub struct Services {
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
}

/// Longest a single echo connection is served.
const ECHO_CONNECTION_LIMIT: Duration = Duration::from_secs(180);

impl Services {
    /// Binds the listeners; call it inside the namespace.
    pub fn start(tcp_ports: &[u16], udp_addrs: &[SocketAddr]) -> Services {
        let services = Services {
            hits: Arc::default(),
            stop: Arc::default(),
        };
        for &port in tcp_ports {
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .unwrap_or_else(|e| panic!("bind tcp [::]:{port}: {e}"));
            listener.set_nonblocking(true).unwrap();
            let (hits, stop) = (services.hits.clone(), services.stop.clone());
            thread::spawn(move || accept_loop(&listener, &hits, &stop));
        }
        for &addr in udp_addrs {
            let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (hits, stop) = (services.hits.clone(), services.stop.clone());
            thread::spawn(move || udp_echo(&socket, addr, &hits, &stop));
        }
        services
    }

    /// Forgets the hits so far.
    pub fn clear(&self) {
        self.hits.lock().unwrap().clear();
    }

    /// Every hit, except those on the lab's readiness probe addresses
    /// ([`addr::INET_PROBE4`], [`addr::INET_PROBE6`]), whose accepts may be recorded late.
    pub fn hits(&self) -> Vec<Hit> {
        let probes = [
            IpAddr::from(addr::INET_PROBE4),
            IpAddr::from(addr::INET_PROBE6),
        ];
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| !probes.contains(&h.local.ip()))
            .cloned()
            .collect()
    }

    /// Hits on `ip` (any port, any protocol).
    pub fn hits_on(&self, ip: IpAddr) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.local.ip() == ip)
            .collect()
    }

    /// Hits whose source is `ip`.
    pub fn hits_from(&self, ip: IpAddr) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.peer.ip() == ip)
            .collect()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: &TcpListener, hits: &Mutex<Vec<Hit>>, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let local = stream.local_addr().map(canonical).unwrap_or(peer);
                hits.lock().unwrap().push(Hit {
                    tcp: true,
                    local,
                    peer: canonical(peer),
                });
                let stop = stop.clone();
                thread::spawn(move || echo_connection(stream, &stop));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Echoes until EOF, an error, the services stop or the connection's time limit.
fn echo_connection(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + ECHO_CONNECTION_LIMIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn udp_echo(socket: &UdpSocket, local: SocketAddr, hits: &Mutex<Vec<Hit>>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        hits.lock().unwrap().push(Hit {
            tcp: false,
            local,
            peer: canonical(peer),
        });
        let _ = socket.send_to(&buf[..len], peer);
    }
}

// ---------------------------------------------------------------------------------------------
// nftables inspection
// ---------------------------------------------------------------------------------------------

/// One element of an nftables set as `nft -j list set` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    /// The key: one address, or the parts of a concatenation (`client . destination`).
    pub key: Vec<String>,
    /// Seconds.
    pub timeout: Option<u64>,
    /// Seconds left.
    pub expires: Option<u64>,
}

impl SetElem {
    /// Whether the key is exactly `parts` (compared as IP addresses where they parse).
    pub fn is(&self, parts: &[&str]) -> bool {
        self.key.len() == parts.len()
            && self.key.iter().zip(parts).all(|(have, want)| {
                match (have.parse::<IpAddr>(), want.parse::<IpAddr>()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => have == want,
                }
            })
    }
}

/// Whether `elems` holds an element with key `parts`.
pub fn has_elem(elems: &[SetElem], parts: &[&str]) -> bool {
    elems.iter().any(|e| e.is(parts))
}

/// The element of `elems` with key `parts`.
pub fn find_elem<'a>(elems: &'a [SetElem], parts: &[&str]) -> Option<&'a SetElem> {
    elems.iter().find(|e| e.is(parts))
}

/// Parses the output of `nft -j list set`.
pub fn parse_set_json(json: &str) -> Result<Vec<SetElem>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft json: {e}: {json}"))?;
    let items = value["nftables"]
        .as_array()
        .ok_or_else(|| format!("no nftables array: {json}"))?;
    let set = items
        .iter()
        .find_map(|item| item.get("set"))
        .ok_or_else(|| format!("no set in: {json}"))?;
    let Some(elems) = set.get("elem") else {
        return Ok(Vec::new());
    };
    let elems = elems
        .as_array()
        .ok_or_else(|| format!("elem is not an array: {json}"))?;
    elems.iter().map(parse_elem).collect()
}

fn parse_elem(value: &serde_json::Value) -> Result<SetElem, String> {
    let (val, timeout, expires) = match value.get("elem") {
        Some(elem) => (
            &elem["val"],
            elem.get("timeout").and_then(serde_json::Value::as_u64),
            elem.get("expires").and_then(serde_json::Value::as_u64),
        ),
        None => (value, None, None),
    };
    let key = match val {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Object(o) if o.contains_key("concat") => o["concat"]
            .as_array()
            .ok_or("concat is not an array")?
            .iter()
            .map(|part| {
                part.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| part.to_string())
            })
            .collect(),
        other => vec![other.to_string()],
    };
    Ok(SetElem {
        key,
        timeout,
        expires,
    })
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// Addresses of the topology.
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    pub const GW_INET4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    pub const INET_GW4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    pub const GW_INET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
    pub const INET_GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2);

    pub const GW_A1_4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    pub const A1_4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    pub const GW_A1_6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
    pub const A1_6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

    pub const GW_A2_4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
    pub const A2_4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
    pub const GW_A2_6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 1);
    pub const A2_6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 2);

    /// Where the lab checks its paths before a test starts ([`super::Services::hits`] leaves
    /// them out; tests must not use these addresses).
    pub const INET_PROBE4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    pub const INET_PROBE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);

    /// The trusted upstream dnsfence forwards to.
    pub const UPSTREAM: &str = "198.51.100.53:53";
    /// Another DNS server (the one an agent would like to use instead).
    pub const OTHER_DNS4: &str = "198.51.100.99:53";
    pub const OTHER_DNS6: &str = "[2001:db8:100::99]:53";

    pub fn sa(text: &str) -> SocketAddr {
        text.parse()
            .unwrap_or_else(|e| panic!("socket address {text}: {e}"))
    }
}

/// TCP ports of the echo services in `inet`.
pub const TCP_SERVICES: [u16; 3] = [80, 443, 853];
/// UDP echo services in `inet` (QUIC-like 443); datagrams to other addresses get ICMP port
/// unreachable, which [`UdpReach::Refused`] reports as "reached the host".
pub const UDP_SERVICES: [&str; 6] = [
    "198.51.100.10:443",
    "198.51.100.20:443",
    "198.51.100.66:443",
    "[2001:db8:100::10]:443",
    "[2001:db8:100::20]:443",
    "[2001:db8:100::66]:443",
];

/// The running `dnsfence serve` in the gateway namespace.
struct Fence {
    child: Child,
}

/// One test's private internet. See the module documentation for the layout.
pub struct Lab {
    fence: Mutex<Option<Fence>>,
    /// The trusted upstream at 198.51.100.53:53 (UDP and TCP), inside `inet`.
    pub upstream: Upstream,
    /// Another DNS server at 198.51.100.99:53, inside `inet`.
    pub other_dns4: Upstream,
    /// Another DNS server at [2001:db8:100::99]:53, inside `inet`.
    pub other_dns6: Upstream,
    /// Echo services on every `inet` address.
    pub services: Services,
    pub gw: Netns,
    pub inet: Netns,
    pub agent1: Netns,
    pub agent2: Netns,
    /// Short name of the test, for table names.
    pub tag: String,
    /// Policy file, query log and dnsfence's stderr live here.
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Builds the topology and starts the services in `inet`. `tag` is a short name of the
    /// test (letters, digits, `_`), used in the nftables table name.
    pub fn new(tag: &str) -> Lab {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // Every lab runs these; checked first so a missing one fails with its package before
        // anything is built.
        for program in ["ip", "nft", "timeout"] {
            require_tool(program);
        }
        sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{seq}-", std::process::id());
        // Each namespace is deleted by its own guard if a later step panics.
        let gw = Netns::create(&format!("{base}gw"));
        let inet = Netns::create(&format!("{base}inet"));
        let agent1 = Netns::create(&format!("{base}a1"));
        let agent2 = Netns::create(&format!("{base}a2"));

        // No duplicate address detection anywhere (it would hold IPv6 back for a second or two);
        // set before the links exist so they inherit it.
        for ns in [&gw, &inet, &agent1, &agent2] {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        }
        gw.sysctl("net.ipv4.ip_forward", "1");
        gw.sysctl("net.ipv6.conf.all.forwarding", "1");

        // Links are created inside the namespaces, so their names are private to each one.
        gw.ip(&[
            "link",
            "add",
            "to-inet",
            "type",
            "veth",
            "peer",
            "name",
            "to-gw",
            "netns",
            inet.name(),
        ]);
        gw.ip(&[
            "link",
            "add",
            "to-a1",
            "type",
            "veth",
            "peer",
            "name",
            "to-gw",
            "netns",
            agent1.name(),
        ]);
        gw.ip(&[
            "link",
            "add",
            "to-a2",
            "type",
            "veth",
            "peer",
            "name",
            "to-gw",
            "netns",
            agent2.name(),
        ]);

        let v4 = |ns: &Netns, cidr: &str, dev: &str| ns.ip(&["addr", "add", cidr, "dev", dev]);
        let v6 = |ns: &Netns, cidr: &str, dev: &str| {
            ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        };
        v4(&gw, "192.0.2.1/30", "to-inet");
        v6(&gw, "2001:db8:ffff::1/64", "to-inet");
        v4(&gw, "10.77.0.1/24", "to-a1");
        v6(&gw, "fd77::1/64", "to-a1");
        v4(&gw, "10.78.0.1/24", "to-a2");
        v6(&gw, "fd78::1/64", "to-a2");
        v4(&inet, "192.0.2.2/30", "to-gw");
        v6(&inet, "2001:db8:ffff::2/64", "to-gw");
        v4(&agent1, "10.77.0.2/24", "to-gw");
        v6(&agent1, "fd77::2/64", "to-gw");
        v4(&agent2, "10.78.0.2/24", "to-gw");
        v6(&agent2, "fd78::2/64", "to-gw");
        for dev in ["to-inet", "to-a1", "to-a2"] {
            gw.ip(&["link", "set", dev, "up"]);
        }
        for ns in [&inet, &agent1, &agent2] {
            ns.ip(&["link", "set", "to-gw", "up"]);
        }

        gw.ip(&["route", "add", "default", "via", "192.0.2.2"]);
        gw.ip(&["-6", "route", "add", "default", "via", "2001:db8:ffff::2"]);

        // The internet: every address of its ranges is local (AnyIP); only the agents' and the
        // gateway's ranges route back, there is no default route.
        for range in ["198.51.100.0/24", "203.0.113.0/24"] {
            inet.ip(&["route", "add", "local", range, "dev", "lo"]);
        }
        inet.ip(&[
            "-6",
            "route",
            "add",
            "local",
            "2001:db8:100::/64",
            "dev",
            "lo",
        ]);
        inet.ip(&["route", "add", "10.0.0.0/8", "via", "192.0.2.1"]);
        inet.ip(&["-6", "route", "add", "fd00::/8", "via", "2001:db8:ffff::1"]);
        inet.sysctl("net.ipv4.ip_nonlocal_bind", "1");
        inet.sysctl("net.ipv6.ip_nonlocal_bind", "1");

        for (ns, gw4, gw6) in [
            (&agent1, "10.77.0.1", "fd77::1"),
            (&agent2, "10.78.0.1", "fd78::1"),
        ] {
            ns.ip(&["route", "add", "default", "via", gw4]);
            ns.ip(&["-6", "route", "add", "default", "via", gw6]);
        }

        let (upstream, other_dns4, other_dns6, services) = inet.run(|| {
            (
                Upstream::start_at(addr::sa(addr::UPSTREAM)),
                Upstream::start_at(addr::sa(addr::OTHER_DNS4)),
                Upstream::start_at(addr::sa(addr::OTHER_DNS6)),
                Services::start(&TCP_SERVICES, &UDP_SERVICES.map(addr::sa)),
            )
        });

        // Wait until every path carries traffic (IPv6 neighbours, routes), then forget the
        // probes so tests only see their own traffic.
        let ready = [
            SocketAddr::from((addr::INET_PROBE4, 80)),
            SocketAddr::from((addr::INET_PROBE6, 80)),
        ];
        for ns in [&agent1, &agent2, &gw] {
            let unready = ns.run(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut unready: Vec<SocketAddr> = ready.to_vec();
                while !unready.is_empty() && Instant::now() < deadline {
                    unready.retain(|t| {
                        TcpStream::connect_timeout(t, Duration::from_millis(100)).is_err()
                    });
                    if !unready.is_empty() {
                        thread::sleep(Duration::from_millis(20));
                    }
                }
                unready
            });
            assert!(
                unready.is_empty(),
                "{}: no path to {unready:?} after 10 s",
                ns.name()
            );
        }
        services.clear();

        Lab {
            fence: Mutex::new(None),
            upstream,
            other_dns4,
            other_dns6,
            services,
            gw,
            inet,
            agent1,
            agent2,
            tag: tag.to_owned(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// agent1 (10.77.0.2, fd77::2), asking dnsfence at 10.77.0.1:53 / [fd77::1]:53.
    pub fn a1(&self) -> Host<'_> {
        Host {
            ns: &self.agent1,
            v4: addr::A1_4,
            v6: addr::A1_6,
            dns4: SocketAddr::new(addr::GW_A1_4.into(), 53),
            dns6: SocketAddr::new(addr::GW_A1_6.into(), 53),
        }
    }

    /// agent2 (10.78.0.2, fd78::2), asking dnsfence at 10.78.0.1:53 / [fd78::1]:53.
    pub fn a2(&self) -> Host<'_> {
        Host {
            ns: &self.agent2,
            v4: addr::A2_4,
            v6: addr::A2_6,
            dns4: SocketAddr::new(addr::GW_A2_4.into(), 53),
            dns6: SocketAddr::new(addr::GW_A2_6.into(), 53),
        }
    }

    /// A process on the gateway itself (root, no mark), asking dnsfence at 127.0.0.1:53 (both
    /// `dns4` and `dns6`: dnsfence is not told to listen on ::1).
    pub fn gw_host(&self) -> Host<'_> {
        Host {
            ns: &self.gw,
            v4: addr::GW_INET4,
            v6: addr::GW_INET6,
            dns4: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53),
            dns6: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53),
        }
    }

    /// The nftables table name for this test's policy.
    pub fn table(&self) -> String {
        format!("dnsfence_{}", self.tag)
    }

    /// The addresses dnsfence is told to listen on (`--listen`), the agents' first.
    pub fn listen_addrs() -> Vec<SocketAddr> {
        vec![
            SocketAddr::new(addr::GW_A1_4.into(), 53),
            SocketAddr::new(addr::GW_A1_6.into(), 53),
            SocketAddr::new(addr::GW_A2_4.into(), 53),
            SocketAddr::new(addr::GW_A2_6.into(), 53),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53),
        ]
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("queries.jsonl")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("dnsfence.stderr")
    }

    /// dnsfence's stderr so far (all runs).
    pub fn fence_stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Writes `policy_yaml` and runs `ip netns exec <gw> dnsfence serve --policy .. --listen ..
    /// --log ..`, then waits until every listen address accepts TCP from where a client would
    /// ask (agents, and the gateway for 127.0.0.1). Panics with dnsfence's stderr if it exits.
    pub fn start_fence(&self, policy_yaml: &str) {
        assert!(
            self.fence.lock().unwrap().is_none(),
            "dnsfence is already running"
        );
        std::fs::write(self.policy_path(), policy_yaml).unwrap();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .unwrap();
        let mut command = self.gw.command(BIN);
        command.arg("serve").arg("--policy").arg(self.policy_path());
        for listen in Self::listen_addrs() {
            command.arg("--listen").arg(listen.to_string());
        }
        command
            .arg("--log")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // If the test process dies without running its destructors (SIGKILL, abort), dnsfence
        // goes with it instead of keeping the namespace alive.
        // SAFETY: the closure runs between fork and exec and only makes one prctl(2) call,
        // which is async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)
            });
        }
        let child = command.spawn().expect("start dnsfence");
        *self.fence.lock().unwrap() = Some(Fence { child });
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut pending = Self::listen_addrs();
        while !pending.is_empty() {
            if let Some(status) = self.fence_exited() {
                panic!(
                    "dnsfence exited ({status}) before listening; stderr:\n{}",
                    self.fence_stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dnsfence is not accepting on {pending:?} after 15 s; stderr:\n{}",
                self.fence_stderr()
            );
            pending.retain(|&listen| {
                let ns = if listen.ip().is_loopback() {
                    &self.gw
                } else if listen.ip() == IpAddr::from(addr::GW_A1_4)
                    || listen.ip() == IpAddr::from(addr::GW_A1_6)
                {
                    &self.agent1
                } else {
                    &self.agent2
                };
                !ns.run(move || {
                    TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
                })
            });
            if !pending.is_empty() {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn fence_exited(&self) -> Option<ExitStatus> {
        self.fence
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|f| f.child.try_wait().ok().flatten())
    }

    /// dnsfence's process id, while it runs (for signals such as SIGHUP).
    pub fn fence_pid(&self) -> Option<u32> {
        self.fence.lock().unwrap().as_ref().map(|f| f.child.id())
    }

    /// Whether dnsfence is (still) running.
    pub fn fence_running(&self) -> bool {
        self.fence.lock().unwrap().is_some() && self.fence_exited().is_none()
    }

    /// SIGTERM to dnsfence and waits (at most 10 s) for it to exit.
    pub fn stop_fence(&self) -> ExitStatus {
        let mut fence = self
            .fence
            .lock()
            .unwrap()
            .take()
            .expect("dnsfence is not running");
        let pid = nix::unistd::Pid::from_raw(fence.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = fence.child.try_wait().expect("wait dnsfence") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = fence.child.kill();
                let _ = fence.child.wait();
                panic!(
                    "dnsfence did not exit within 10 s of SIGTERM; stderr:\n{}",
                    self.fence_stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The query log, waiting (at most 5 s) for at least `at_least` lines.
    pub fn log(&self, at_least: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = read_log(&self.log_path());
            if lines.len() >= at_least || Instant::now() > deadline {
                return lines;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nft -j list set inet <table> <set>` in the gateway, parsed.
    pub fn try_set_elements(&self, set: &str) -> Result<Vec<SetElem>, String> {
        let table = self.table();
        let out = self.gw.exec(
            Duration::from_secs(10),
            &["nft", "-j", "list", "set", "inet", &table, set],
        );
        if !out.status.success() {
            return Err(format!(
                "nft list set inet {table} {set}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse_set_json(&String::from_utf8_lossy(&out.stdout))
    }

    /// Like [`try_set_elements`](Self::try_set_elements), panicking when the set is missing.
    pub fn set_elements(&self, set: &str) -> Vec<SetElem> {
        self.try_set_elements(set).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The whole ruleset of the gateway (for failure messages).
    pub fn ruleset(&self) -> String {
        let out = self
            .gw
            .exec(Duration::from_secs(10), &["nft", "list", "ruleset"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let fence = self
            .fence
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut fence) = fence {
            let _ = fence.child.kill();
            let _ = fence.child.wait();
        }
        // The fields drop next: the upstreams and services stop, then every namespace is
        // deleted (with its veths and nftables tables).
    }
}

/// A client in one namespace: an agent, or a process on the gateway itself.
#[derive(Clone, Copy)]
pub struct Host<'a> {
    pub ns: &'a Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// dnsfence as this host reaches it, over IPv4 and IPv6.
    pub dns4: SocketAddr,
    pub dns6: SocketAddr,
}

impl Host<'_> {
    /// Runs `f` inside this host's namespace.
    pub fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.ns.run(f)
    }

    /// Asks dnsfence over UDP/IPv4 (3 s); panics without a reply.
    pub fn resolve(&self, qname: &str, qtype: RecordType) -> Message {
        self.try_resolve(self.dns4, qname, qtype, false)
            .unwrap_or_else(|e| panic!("{qname} {qtype} via {}: {e}", self.dns4))
    }

    /// Asks dnsfence over UDP/IPv6 (3 s); panics without a reply.
    pub fn resolve6(&self, qname: &str, qtype: RecordType) -> Message {
        self.try_resolve(self.dns6, qname, qtype, false)
            .unwrap_or_else(|e| panic!("{qname} {qtype} via {}: {e}", self.dns6))
    }

    /// Asks dnsfence over TCP/IPv4 (3 s); panics without a reply.
    pub fn resolve_tcp(&self, qname: &str, qtype: RecordType) -> Message {
        self.try_resolve(self.dns4, qname, qtype, true)
            .unwrap_or_else(|e| panic!("{qname} {qtype} via tcp {}: {e}", self.dns4))
    }

    /// Asks `server` over UDP or TCP, 3 s bound.
    pub fn try_resolve(
        &self,
        server: SocketAddr,
        qname: &str,
        qtype: RecordType,
        tcp: bool,
    ) -> io::Result<Message> {
        let message = query(qname, qtype);
        let limit = Duration::from_secs(3);
        self.ns.run(move || {
            if tcp {
                dns_tcp(server, &message, limit)
            } else {
                dns_udp(server, &message, limit)
            }
        })
    }

    /// One TCP connection attempt within `limit`.
    pub fn probe(&self, target: SocketAddr, limit: Duration) -> Reach {
        self.ns.run(move || tcp_probe(target, limit))
    }

    /// Several TCP connection attempts at once (each within `limit`), in order of `targets`.
    pub fn probe_all(&self, targets: &[SocketAddr], limit: Duration) -> Vec<Reach> {
        let targets = targets.to_vec();
        self.ns.run(move || {
            thread::scope(|scope| {
                let handles: Vec<_> = targets
                    .iter()
                    .map(|&t| scope.spawn(move || tcp_probe(t, limit)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        })
    }

    /// A TCP connection opened from this host (must succeed within [`CONNECT_OK`]).
    pub fn open(&self, target: SocketAddr) -> TcpStream {
        self.ns
            .run(move || tcp_open(target, CONNECT_OK))
            .unwrap_or_else(|e| panic!("connect {target}: {e}"))
    }

    /// One datagram to a UDP echo service, waiting `wait` for the echo.
    pub fn udp(&self, target: SocketAddr, wait: Duration) -> UdpReach {
        self.ns.run(move || udp_probe(target, b"ping", wait))
    }

    /// Several UDP probes at once.
    pub fn udp_all(&self, targets: &[SocketAddr], wait: Duration) -> Vec<UdpReach> {
        let targets = targets.to_vec();
        self.ns.run(move || {
            thread::scope(|scope| {
                let handles: Vec<_> = targets
                    .iter()
                    .map(|&t| scope.spawn(move || udp_probe(t, b"ping", wait)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        })
    }
}
