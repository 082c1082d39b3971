//! Stage 3: forward an allowed question to the trusted resolvers.
//!
//! Each upstream gets its own hickory resolver (with its own bounded cache), and they are tried
//! strictly in the policy's order so the log can name the one that answered. The resolver builds
//! a fresh message for every query: the upstream never sees the client's ID, bytes or EDNS
//! options (client subnet, cookies), only dnsfence's.
//!
//! Every socket the resolvers open carries the policy's firewall mark. The ruleset lets only
//! marked packets reach an upstream, and setting a mark needs `CAP_NET_ADMIN`, so an agent cannot
//! talk to the upstream itself and tunnel through it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

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

/// Entries of each upstream's answer cache. Bounded so that an agent asking for endless unique
/// names under an allowed wildcard cannot grow memory.
const CACHE_ENTRIES: u64 = 16_384;

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

/// The ordered set of trusted resolvers.
pub struct Upstreams {
    resolvers: Vec<(SocketAddr, Resolver<MarkedRuntime>)>,
    per_upstream: Duration,
    total_timeout: Duration,
}

impl Upstreams {
    /// Builds one resolver per upstream. `mark` is put on every socket (0: none).
    pub fn new(
        upstreams: &[SocketAddr],
        total_timeout: Duration,
        mark: u32,
    ) -> Result<Upstreams, NetError> {
        // Leave every upstream a fair share of the total, so the last one is still tried.
        let count = u32::try_from(upstreams.len().max(1)).unwrap_or(u32::MAX);
        let per_upstream = (total_timeout / count).max(Duration::from_millis(50));
        let mut resolvers = Vec::with_capacity(upstreams.len());
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
            opts.cache_size = CACHE_ENTRIES;
            opts.num_concurrent_reqs = 1;
            opts.max_active_requests = 4096;
            opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
            opts.try_tcp_on_error = false;
            resolvers.push((addr, builder.build()?));
        }
        Ok(Upstreams {
            resolvers,
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
        let mut last = UpstreamFailure {
            upstream: None,
            reason: "no upstream configured".to_owned(),
        };
        let attempt = async {
            for (addr, resolver) in &self.resolvers {
                // hickory may spend its timeout once per transport; hold each upstream to its
                // share so the next one is still tried in time.
                let lookup =
                    tokio::time::timeout(self.per_upstream, resolver.lookup(name.clone(), qtype));
                match lookup.await {
                    Err(_elapsed) => {
                        last = UpstreamFailure {
                            upstream: Some(*addr),
                            reason: format!(
                                "{addr} did not answer within {} ms",
                                self.per_upstream.as_millis()
                            ),
                        };
                    }
                    Ok(Ok(lookup)) if !answers_question(lookup.message(), name, qtype) => {
                        last = UpstreamFailure {
                            upstream: Some(*addr),
                            reason: format!("{addr} answered another question"),
                        };
                    }
                    Ok(Ok(lookup)) => {
                        return Ok(UpstreamAnswer {
                            upstream: *addr,
                            rcode: lookup.message().metadata.response_code,
                            answers: lookup.answers().to_vec(),
                            soa: None,
                        });
                    }
                    Ok(Err(error)) => match negative_answer(*addr, error) {
                        Ok(answer) => return Ok(answer),
                        Err(failure) => last = failure,
                    },
                }
            }
            Err(())
        };
        match tokio::time::timeout(self.total_timeout, attempt).await {
            Ok(Ok(answer)) => Ok(answer),
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

fn set_mark(socket: socket2::SockRef<'_>, mark: u32) -> io::Result<()> {
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
