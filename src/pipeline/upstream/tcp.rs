//! Truncated answers, asked again over TCP (for now through hickory-resolver).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
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
use tokio::net::{TcpStream, UdpSocket};

use super::answer::UpstreamAnswer;
use super::socket;

/// Entries of hickory's own cache, which sees only the truncated (TCP) answers.
const TCP_CACHE_ENTRIES: u64 = 1024;

/// Asks one upstream over TCP.
pub struct TcpClient {
    addr: SocketAddr,
    resolver: Resolver<MarkedRuntime>,
}

impl TcpClient {
    pub fn new(addr: SocketAddr, timeout: Duration, mark: u32) -> Result<TcpClient, NetError> {
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
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = TCP_CACHE_ENTRIES;
        opts.num_concurrent_reqs = 1;
        opts.max_active_requests = 4096;
        opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
        opts.try_tcp_on_error = false;
        Ok(TcpClient {
            addr,
            resolver: builder.build()?,
        })
    }

    /// The question through hickory, which retries over TCP when the answer is truncated.
    pub async fn query(&self, name: &Name, qtype: RecordType) -> Result<UpstreamAnswer, String> {
        match self.resolver.lookup(name.clone(), qtype).await {
            Ok(lookup) if !answers_question(lookup.message(), name, qtype) => {
                Err(format!("{} answered another question", self.addr))
            }
            Ok(lookup) => Ok(UpstreamAnswer {
                upstream: self.addr,
                rcode: lookup.message().metadata.response_code,
                answers: lookup.answers().to_vec(),
                soa: None,
            }),
            Err(error) => negative_answer(self.addr, error),
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
fn negative_answer(upstream: SocketAddr, error: NetError) -> Result<UpstreamAnswer, String> {
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
    Err(error.to_string())
}

/// Tokio's runtime provider, with the firewall mark set on every upstream socket.
#[derive(Clone)]
struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    mark: u32,
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
            let socket = socket::tcp(server_addr, mark)?;
            if let Some(bind_addr) = bind_addr {
                socket.bind(bind_addr)?;
            }
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
                socket2::Type::DGRAM.nonblocking(),
                Some(socket2::Protocol::UDP),
            )?;
            socket::set_mark(socket2::SockRef::from(&socket), mark)?;
            socket.bind(&local_addr.into())?;
            UdpSocket::from_std(socket.into())
        })
    }
}
