//! A scripted upstream DNS server on loopback (UDP and TCP, one port) that records every query.
//!
//! It answers like a recursive resolver would for its zone: the whole CNAME chain and then the
//! records of the asked type, NXDOMAIN with an SOA for unknown names, NODATA with an SOA for
//! known names without the type. Behaviours let a test make it misbehave on purpose.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// One query the upstream received.
#[derive(Debug, Clone)]
pub struct SeenQuery {
    /// The name in lower case (as the log prints it).
    pub name: String,
    pub qtype: RecordType,
    pub tcp: bool,
    pub id: u16,
    /// EDNS option codes the query carried.
    pub edns_options: Vec<u16>,
    /// Where the query came from (address and source port).
    pub peer: SocketAddr,
    /// The question's wire labels, byte for byte (original case, no escaping).
    pub labels: Vec<Vec<u8>>,
    /// The question's class.
    pub qclass: u16,
}

/// How the upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Never answer.
    Silent,
    /// Answer with this rcode and nothing else.
    Rcode(ResponseCode),
    /// Answer with a wrong message ID.
    WrongId,
    /// Answer a different question than asked.
    WrongQuestion,
    /// Answer with QR=0.
    NotAResponse,
    /// Send a 12-byte header only.
    HeaderOnly,
    /// Answer every UDP query with TC set and no records, and refuse TCP.
    TruncatedNoTcp,
    /// Answer after this many milliseconds.
    Slow(u64),
}

#[derive(Default)]
struct Zone {
    records: HashMap<(String, RecordType), Vec<Record>>,
    names: std::collections::HashSet<String>,
    /// Extra records put in the answer section of every response (foreign names).
    extra_answers: Vec<Record>,
    /// Extra records put in the additional section of every response.
    extra_additionals: Vec<Record>,
    /// The SOA put in the authority section of negative answers (default: `test.`).
    negative_soa: Option<Record>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    seen: Arc<Mutex<Vec<SeenQuery>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    /// When set, every UDP query gets an empty TC answer (forcing a retry over TCP) and TCP
    /// queries are answered with this behaviour instead of `behaviour`.
    tcp_behaviour: Arc<Mutex<Option<Behaviour>>>,
    /// UDP queries still to be received and ignored, as if lost on the way.
    lose_udp: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<AtomicBool>,
    /// The UDP socket, for sending forged replies from the upstream's own address and port.
    udp: UdpSocket,
}

fn key(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    }
}

pub fn name(text: &str) -> Name {
    Name::from_ascii(key(text)).expect("test name")
}

impl Upstream {
    /// Starts on a free loopback port.
    pub fn start() -> Upstream {
        Self::start_on("127.0.0.1")
    }

    pub fn start_on(ip: &str) -> Upstream {
        // Find a port free for both UDP and TCP.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((ip, 0)).expect("bind upstream udp");
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind((ip, port)) {
                break (udp, tcp);
            }
        };
        Self::serve(udp, tcp)
    }

    /// Starts on exactly `addr` (UDP and TCP), e.g. port 53 on an address inside a network
    /// namespace: call it from a thread that entered the namespace.
    pub fn start_at(addr: SocketAddr) -> Upstream {
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind upstream udp {addr}: {e}"));
        let tcp =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind upstream tcp {addr}: {e}"));
        Self::serve(udp, tcp)
    }

    fn serve(udp: UdpSocket, tcp: TcpListener) -> Upstream {
        let addr = udp.local_addr().unwrap();
        let upstream = Upstream {
            addr,
            zone: Arc::default(),
            seen: Arc::default(),
            behaviour: Arc::new(Mutex::new(Behaviour::Normal)),
            tcp_behaviour: Arc::default(),
            lose_udp: Arc::default(),
            stop: Arc::default(),
            udp: udp.try_clone().expect("clone upstream udp socket"),
        };
        upstream.spawn_udp(udp);
        upstream.spawn_tcp(tcp);
        upstream
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// Misbehaves over TCP only: UDP queries are answered TC (so the client must retry over
    /// TCP), and TCP queries get `behaviour`.
    /// The next `count` UDP queries are recorded but never answered (lost datagrams).
    pub fn lose_next_udp(&self, count: u32) {
        self.lose_udp.store(count, Ordering::Relaxed);
    }

    pub fn set_tcp_behaviour(&self, behaviour: Behaviour) {
        *self.tcp_behaviour.lock().unwrap() = Some(behaviour);
    }

    /// The SOA record negative answers carry in their authority section.
    pub fn set_negative_soa(&self, soa: Record) {
        self.zone.lock().unwrap().negative_soa = Some(soa);
    }

    pub fn add(&self, record: Record) -> &Self {
        let mut zone = self.zone.lock().unwrap();
        let k = key(&record.name.to_ascii());
        zone.names.insert(k.clone());
        zone.records
            .entry((k, record.record_type()))
            .or_default()
            .push(record);
        self
    }

    pub fn a(&self, owner: &str, ip: &str, ttl: u32) -> &Self {
        self.add(Record::from_rdata(
            name(owner),
            ttl,
            RData::A(A(ip.parse().unwrap())),
        ))
    }

    pub fn aaaa(&self, owner: &str, ip: &str, ttl: u32) -> &Self {
        self.add(Record::from_rdata(
            name(owner),
            ttl,
            RData::AAAA(AAAA(ip.parse().unwrap())),
        ))
    }

    pub fn cname(&self, owner: &str, target: &str, ttl: u32) -> &Self {
        self.add(Record::from_rdata(
            name(owner),
            ttl,
            RData::CNAME(CNAME(name(target))),
        ))
    }

    pub fn txt(&self, owner: &str, text: &str, ttl: u32) -> &Self {
        self.add(Record::from_rdata(
            name(owner),
            ttl,
            RData::TXT(TXT::new(vec![text.to_owned()])),
        ))
    }

    pub fn extra_answer(&self, record: Record) {
        self.zone.lock().unwrap().extra_answers.push(record);
    }

    pub fn extra_additional(&self, record: Record) {
        self.zone.lock().unwrap().extra_additionals.push(record);
    }

    pub fn seen(&self) -> Vec<SeenQuery> {
        self.seen.lock().unwrap().clone()
    }

    /// Queries seen for names ending in `suffix` (case-insensitive).
    pub fn seen_for(&self, suffix: &str) -> Vec<SeenQuery> {
        let suffix = key(suffix);
        self.seen()
            .into_iter()
            .filter(|q| key(&q.name).ends_with(&suffix))
            .collect()
    }

    /// Sends `bytes` to `to` from the upstream's own UDP address and port, as a forger who
    /// spoofs the upstream would.
    pub fn send_from_upstream(&self, bytes: &[u8], to: SocketAddr) {
        self.udp
            .send_to(bytes, to)
            .expect("send from the upstream's socket");
    }

    /// Serves the same zone over DNS over TLS with `config`, on a new loopback port; queries
    /// are recorded as TCP ones. Each connection is served by a thread, queries in order.
    pub fn serve_tls(&self, config: Arc<rustls::ServerConfig>) -> SocketAddr {
        self.serve_tls_at("127.0.0.1:0".parse().unwrap(), config)
    }

    /// Like [`serve_tls`](Self::serve_tls) on `addr` (bound in the calling thread's network
    /// namespace).
    pub fn serve_tls_at(&self, addr: SocketAddr, config: Arc<rustls::ServerConfig>) -> SocketAddr {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tls listener {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (zone, seen, behaviour, stop) = self.shared();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((stream, peer)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (zone, seen, behaviour, config) = (
                    zone.clone(),
                    seen.clone(),
                    behaviour.clone(),
                    config.clone(),
                );
                thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(connection) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(connection, stream);
                    loop {
                        let mut len = [0u8; 2];
                        if tls.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if tls.read_exact(&mut buf).is_err() {
                            return;
                        }
                        let b = *behaviour.lock().unwrap();
                        if let Some(reply) = respond(&buf, true, peer, &zone, &seen, b) {
                            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&reply);
                            if tls.write_all(&framed).and_then(|()| tls.flush()).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    pub fn clear_seen(&self) {
        self.seen.lock().unwrap().clear();
    }

    fn spawn_udp(&self, socket: UdpSocket) {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (zone, seen, behaviour, stop) = self.shared();
        let tcp_behaviour = self.tcp_behaviour.clone();
        let lose_udp = self.lose_udp.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            while !stop.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let lost = lose_udp
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok();
                let behaviour = match *tcp_behaviour.lock().unwrap() {
                    _ if lost => Behaviour::Silent,
                    Some(_) => Behaviour::TruncatedNoTcp,
                    None => *behaviour.lock().unwrap(),
                };
                // A slow upstream is slow for each query, not a queue: like a recursive
                // resolver, it works on many questions at once.
                if let Behaviour::Slow(ms) = behaviour {
                    let (bytes, zone, seen) = (buf[..len].to_vec(), zone.clone(), seen.clone());
                    let Ok(socket) = socket.try_clone() else {
                        continue;
                    };
                    thread::spawn(move || {
                        let reply = respond(&bytes, false, peer, &zone, &seen, Behaviour::Normal);
                        thread::sleep(Duration::from_millis(ms));
                        if let Some(reply) = reply {
                            let _ = socket.send_to(&reply, peer);
                        }
                    });
                    continue;
                }
                if let Some(reply) = respond(&buf[..len], false, peer, &zone, &seen, behaviour) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
    }

    fn spawn_tcp(&self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (zone, seen, behaviour, stop) = self.shared();
        let tcp_behaviour = self.tcp_behaviour.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let tcp_only = *tcp_behaviour.lock().unwrap();
                if tcp_only.is_none() && *behaviour.lock().unwrap() == Behaviour::TruncatedNoTcp {
                    drop(stream);
                    continue;
                }
                let behaviour = match tcp_only {
                    Some(b) => Arc::new(Mutex::new(b)),
                    None => behaviour.clone(),
                };
                let (zone, seen) = (zone.clone(), seen.clone());
                thread::spawn(move || serve_tcp(stream, &zone, &seen, &behaviour));
            }
        });
    }

    #[allow(clippy::type_complexity)]
    fn shared(
        &self,
    ) -> (
        Arc<Mutex<Zone>>,
        Arc<Mutex<Vec<SeenQuery>>>,
        Arc<Mutex<Behaviour>>,
        Arc<AtomicBool>,
    ) {
        (
            self.zone.clone(),
            self.seen.clone(),
            self.behaviour.clone(),
            self.stop.clone(),
        )
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_tcp(
    mut stream: TcpStream,
    zone: &Mutex<Zone>,
    seen: &Mutex<Vec<SeenQuery>>,
    behaviour: &Mutex<Behaviour>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut buf).is_err() {
            return;
        }
        let behaviour = *behaviour.lock().unwrap();
        if let Some(reply) = respond(&buf, true, peer, zone, seen, behaviour) {
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}

fn respond(
    bytes: &[u8],
    tcp: bool,
    peer: SocketAddr,
    zone: &Mutex<Zone>,
    seen: &Mutex<Vec<SeenQuery>>,
    behaviour: Behaviour,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    let question = query.queries.first()?.clone();
    seen.lock().unwrap().push(SeenQuery {
        // dnsfence mixes the letter case of what it sends (0x20); `labels` keeps it.
        name: question.name().to_string().to_ascii_lowercase(),
        qtype: question.query_type(),
        tcp,
        id: query.metadata.id,
        edns_options: query
            .edns
            .as_ref()
            .map(|edns| {
                edns.options()
                    .as_ref()
                    .iter()
                    .map(|(code, _)| u16::from(*code))
                    .collect()
            })
            .unwrap_or_default(),
        peer,
        labels: question.name().iter().map(<[u8]>::to_vec).collect(),
        qclass: u16::from(question.query_class()),
    });
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    match behaviour {
        Behaviour::Silent => return None,
        Behaviour::Rcode(rcode) => {
            reply.metadata.response_code = rcode;
            return reply.to_vec().ok();
        }
        Behaviour::HeaderOnly => {
            let mut header = reply.to_vec().ok()?;
            header.truncate(12);
            header[4..12].fill(0);
            return Some(header);
        }
        Behaviour::TruncatedNoTcp if !tcp => {
            reply.metadata.truncation = true;
            return reply.to_vec().ok();
        }
        Behaviour::Slow(ms) => thread::sleep(Duration::from_millis(ms)),
        _ => {}
    }
    let zone = zone.lock().unwrap();
    let mut current = key(&question.name().to_ascii());
    let qtype = question.query_type();
    for _ in 0..20 {
        if let Some(records) = zone.records.get(&(current.clone(), qtype)) {
            reply.add_answers(records.iter().cloned());
            break;
        }
        match zone.records.get(&(current.clone(), RecordType::CNAME)) {
            Some(cnames) if qtype != RecordType::CNAME => {
                reply.add_answers(cnames.iter().cloned());
                let RData::CNAME(target) = &cnames[0].data else {
                    break;
                };
                current = key(&target.0.to_ascii());
            }
            _ => break,
        }
    }
    if reply.answers.is_empty()
        || reply
            .answers
            .iter()
            .all(|r| r.record_type() == RecordType::CNAME && qtype != RecordType::CNAME)
    {
        if !zone.names.contains(&current) {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        let soa = zone.negative_soa.clone().unwrap_or_else(|| {
            Record::from_rdata(
                name("test."),
                300,
                RData::SOA(SOA::new(
                    name("ns.test."),
                    name("hostmaster.test."),
                    1,
                    3600,
                    600,
                    86400,
                    60,
                )),
            )
        });
        reply.add_authority(soa);
    }
    reply.add_answers(zone.extra_answers.iter().cloned());
    reply.add_additionals(zone.extra_additionals.iter().cloned());
    drop(zone);
    match behaviour {
        Behaviour::WrongId => reply.metadata.id = query.metadata.id.wrapping_add(1),
        Behaviour::WrongQuestion => {
            reply.queries.clear();
            reply.add_query(hickory_proto::op::Query::query(name("other.test."), qtype));
        }
        Behaviour::NotAResponse => reply.metadata.message_type = MessageType::Query,
        _ => {}
    }
    let max = if tcp {
        usize::from(u16::MAX)
    } else {
        usize::from(query.max_payload().max(512))
    };
    let mut bytes = reply.to_vec().ok()?;
    if bytes.len() > max {
        let mut truncated = reply.truncate();
        truncated.metadata.truncation = true;
        bytes = truncated.to_vec().ok()?;
    }
    Some(bytes)
}

/// A test CA, and a server certificate for `name` it signed: (CA PEM, TLS server config).
pub fn tls_server(name: &str) -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dnsfence test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (ca.pem(), Arc::new(config))
}
