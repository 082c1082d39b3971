//! Stage 3: forward an allowed question to the trusted resolvers.
//!
//! The upstreams are tried strictly in the policy's order, each within its share of
//! `upstream_timeout`, so the log can name the one that answered. Every query is a fresh message
//! built here: the upstream never sees the client's ID, bytes, EDNS options (client subnet,
//! cookies) or letter case, only dnsfence's.
//!
//! Answers come from the [`AnswerCache`], else over UDP through a pool of long-lived sockets
//! ([`super::forwarder`]), and, when the upstream truncates, over TCP through hickory-resolver.
//!
//! Every socket to an upstream carries the policy's firewall mark. The ruleset lets only marked
//! packets reach an upstream, and setting a mark needs `CAP_NET_ADMIN`, so an agent cannot talk
//! to the upstream itself and tunnel through it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_resolver::Resolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
    ServerOrderingStrategy,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::cache::AnswerCache;
use super::forwarder::UdpPool;

/// How long the first UDP attempt waits before the question is sent again; each next attempt
/// waits twice as long.
const FIRST_RETRANSMIT: Duration = Duration::from_millis(400);

/// Entries of hickory's own cache, which sees only the truncated (TCP) answers.
const TCP_CACHE_ENTRIES: u64 = 1024;

/// A definitive answer from an upstream: records, or a negative answer with its SOA.
#[derive(Debug, Clone)]
pub struct UpstreamAnswer {
    pub upstream: SocketAddr,
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    /// The SOA of a negative answer (NXDOMAIN or NODATA), for negative caching by the client.
    pub soa: Option<Record>,
}

/// Why no upstream gave a definitive answer.
#[derive(Debug, Clone)]
pub struct UpstreamFailure {
    /// The last upstream tried, if any.
    pub upstream: Option<SocketAddr>,
    pub reason: String,
}

/// One trusted resolver: the UDP pool, and hickory for answers that need TCP.
struct Server {
    addr: SocketAddr,
    udp: UdpPool,
    tcp: Resolver<MarkedRuntime>,
}

/// The ordered set of trusted resolvers and the answer cache in front of them.
pub struct Upstreams {
    servers: Vec<Server>,
    cache: AnswerCache,
    per_upstream: Duration,
    total_timeout: Duration,
}

impl Upstreams {
    /// Opens the sockets to every upstream. `mark` is put on every socket (0: none). Must be
    /// called inside the tokio runtime.
    pub fn new(
        upstreams: &[SocketAddr],
        total_timeout: Duration,
        mark: u32,
    ) -> Result<Upstreams, NetError> {
        // Leave every upstream a fair share of the total, so the last one is still tried.
        let count = u32::try_from(upstreams.len().max(1)).unwrap_or(u32::MAX);
        let per_upstream = (total_timeout / count).max(Duration::from_millis(50));
        let mut servers = Vec::with_capacity(upstreams.len());
        for &addr in upstreams {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            let config = ResolverConfig::from_parts(None, vec![], vec![server]);
            let runtime = MarkedRuntime {
                inner: TokioRuntimeProvider::default(),
                mark,
            };
            let mut builder = Resolver::builder_with_config(config, runtime);
            let opts: &mut ResolverOpts = builder.options_mut();
            opts.ndots = 0;
            opts.use_hosts_file = ResolveHosts::Never;
            opts.preserve_intermediates = true;
            opts.timeout = per_upstream;
            opts.attempts = 1;
            opts.cache_size = TCP_CACHE_ENTRIES;
            opts.num_concurrent_reqs = 1;
            opts.max_active_requests = 4096;
            opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
            opts.try_tcp_on_error = false;
            let udp = UdpPool::open(addr, mark)
                .map_err(|error| NetError::from(format!("sockets to {addr}: {error}")))?;
            servers.push(Server {
                addr,
                udp,
                tcp: builder.build()?,
            });
        }
        Ok(Upstreams {
            servers,
            cache: AnswerCache::default(),
            per_upstream,
            total_timeout,
        })
    }

    /// Resolves `name`/`qtype`, trying each upstream in order, within the total timeout.
    pub async fn resolve(
        &self,
        name: &Name,
        qtype: RecordType,
    ) -> Result<UpstreamAnswer, UpstreamFailure> {
        if let Some(hit) = self.cache.get(name, qtype, Instant::now()) {
            return Ok(hit);
        }
        let mut last = UpstreamFailure {
            upstream: None,
            reason: "no upstream configured".to_owned(),
        };
        let attempt = async {
            for server in &self.servers {
                match tokio::time::timeout(self.per_upstream, server.query(name, qtype)).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(reason)) => {
                        last = UpstreamFailure {
                            upstream: Some(server.addr),
                            reason,
                        };
                    }
                    Err(_elapsed) => {
                        last = UpstreamFailure {
                            upstream: Some(server.addr),
                            reason: format!(
                                "{} did not answer within {} ms",
                                server.addr,
                                self.per_upstream.as_millis()
                            ),
                        };
                    }
                }
            }
            Err(())
        };
        match tokio::time::timeout(self.total_timeout, attempt).await {
            Ok(Ok(answer)) => {
                self.cache.put(name, qtype, &answer, Instant::now());
                Ok(answer)
            }
            Ok(Err(())) => Err(last),
            Err(_elapsed) => Err(UpstreamFailure {
                upstream: last.upstream,
                reason: format!(
                    "no answer from the upstreams within {} ms",
                    self.total_timeout.as_millis()
                ),
            }),
        }
    }
}

impl Server {
    /// One upstream's definitive answer (records, NXDOMAIN or NODATA), or why there is none.
    async fn query(&self, name: &Name, qtype: RecordType) -> Result<UpstreamAnswer, String> {
        // A datagram lost on the way is asked again (with a new ID) after a short wait rather
        // than costing the whole timeout; the caller's deadline bounds the attempts.
        let mut wait = FIRST_RETRANSMIT;
        let message = loop {
            match tokio::time::timeout(wait, self.udp.exchange(name, qtype)).await {
                Ok(reply) => break reply?,
                Err(_elapsed) => wait = wait.saturating_mul(2),
            }
        };
        if message.metadata.truncation {
            return self.query_tcp(name, qtype).await;
        }
        let rcode = message.metadata.response_code;
        if !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            return Err(format!("{} answered {rcode}", self.addr));
        }
        let Message {
            answers,
            authorities,
            ..
        } = message;
        Ok(UpstreamAnswer {
            upstream: self.addr,
            rcode,
            answers,
            soa: authorities
                .into_iter()
                .find(|r| r.record_type() == RecordType::SOA),
        })
    }

    /// The same question through hickory, which retries over TCP when the answer is truncated.
    async fn query_tcp(&self, name: &Name, qtype: RecordType) -> Result<UpstreamAnswer, String> {
        match self.tcp.lookup(name.clone(), qtype).await {
            Ok(lookup) if !answers_question(lookup.message(), name, qtype) => {
                Err(format!("{} answered another question", self.addr))
            }
            Ok(lookup) => Ok(UpstreamAnswer {
                upstream: self.addr,
                rcode: lookup.message().metadata.response_code,
                answers: lookup.answers().to_vec(),
                soa: None,
            }),
            Err(error) => negative_answer(self.addr, error).map_err(|failure| failure.reason),
        }
    }
}

/// Whether `response` is about exactly the question asked. hickory checks this for UDP but
/// not for TCP, where a reply is matched to its query by ID alone.
fn answers_question(response: &Message, name: &Name, qtype: RecordType) -> bool {
    match response.queries.as_slice() {
        [query] => {
            query.name() == name
                && query.query_type() == qtype
                && query.query_class() == DNSClass::IN
        }
        _ => false,
    }
}

/// Hickory reports NXDOMAIN and NODATA as errors; they are definitive answers all the same.
fn negative_answer(
    upstream: SocketAddr,
    error: NetError,
) -> Result<UpstreamAnswer, UpstreamFailure> {
    if error.is_no_records_found() {
        let rcode = if error.is_nx_domain() {
            ResponseCode::NXDomain
        } else {
            ResponseCode::NoError
        };
        let soa = error.into_soa().map(|soa| soa.into_record_of_rdata());
        return Ok(UpstreamAnswer {
            upstream,
            rcode,
            answers: Vec::new(),
            soa,
        });
    }
    Err(UpstreamFailure {
        upstream: Some(upstream),
        reason: error.to_string(),
    })
}

/// Tokio's runtime provider, with the firewall mark set on every upstream socket.
#[derive(Clone)]
struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    mark: u32,
}

pub(super) fn set_mark(socket: socket2::SockRef<'_>, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    socket.set_mark(mark).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot set socket mark {mark:#x} on an upstream socket (needs CAP_NET_ADMIN): {error}"),
        )
    })
}

impl RuntimeProvider for MarkedRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.inner.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = Result<Self::Tcp, io::Error>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let socket = match server_addr {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }?;
            set_mark(socket2::SockRef::from(&socket), mark)?;
            if let Some(bind_addr) = bind_addr {
                socket.bind(bind_addr)?;
            }
            socket.set_nodelay(true)?;
            let wait_for = wait_for.unwrap_or(Duration::from_secs(2));
            match tokio::time::timeout(wait_for, socket.connect(server_addr)).await {
                Ok(Ok(stream)) => Ok(AsyncIoTokioAsStd(stream)),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TCP connect to the upstream timed out",
                )),
            }
        })
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = Result<Self::Udp, io::Error>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(local_addr),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            set_mark(socket2::SockRef::from(&socket), mark)?;
            socket.set_nonblocking(true)?;
            socket.bind(&local_addr.into())?;
            UdpSocket::from_std(socket.into())
        })
    }
}
