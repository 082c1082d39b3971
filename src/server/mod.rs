//! The DNS server: listeners, the request handler, and graceful shutdown.
//!
//! Every listen address gets a UDP socket (`udp.rs`: a bounded task per datagram) and a TCP
//! listener (`tcp.rs`: connection limits, slowloris deadlines, pipelining). Both hand each
//! message to [`Handler::handle_wire`], which parses it with hickory-server's request type
//! (FORMERR for what does not parse, silence for responses sent to the port, both logged as
//! `malformed`) and runs hickory's `RequestHandler` interface on it. The handler runs the
//! [`Pipeline`], builds the reply with dnsfence's own EDNS (so a UDP
//! reply never exceeds 1232 bytes and is truncated with TC instead of fragmented), sends it, and
//! only then writes the log record, which carries the truncation flag and the real latency.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::health::Readiness;
use crate::pipeline::decision::DenyReason;
use crate::pipeline::request::{Rejection, question_of};
use crate::pipeline::{Pipeline, Transport};
use crate::querylog::QueryLog;
pub use tcp::TcpLimits;

mod tcp;
mod udp;

/// Largest UDP reply: the DNS Flag Day 2020 size, which fits every common path MTU, so replies
/// are truncated (TC) and retried over TCP rather than fragmented.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Serves `pipeline` on `listen` (UDP and TCP on each) until `shutdown` completes; tells
/// `readiness` once every socket is bound, and that it is stopping when `shutdown` completes.
pub async fn serve(
    pipeline: Arc<Pipeline>,
    log: QueryLog,
    listen: &[SocketAddr],
    tcp_limits: TcpLimits,
    readiness: &Readiness,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let handler = Arc::new(Handler { pipeline, log });
    let (stop, stopped) = watch::channel(false);
    let mut servers = Vec::with_capacity(listen.len() * 2);
    for &addr in listen {
        let socket = Arc::new(bind_udp(addr)?);
        let listener = bind_tcp(addr)?;
        servers.push(tokio::spawn(udp::serve_udp(
            socket,
            handler.clone(),
            stopped.clone(),
        )));
        servers.push(tokio::spawn(tcp::serve_tcp(
            listener,
            handler.clone(),
            tcp_limits,
            stopped.clone(),
        )));
        tracing::info!(%addr, "listening on UDP and TCP");
    }
    readiness.set_listeners_bound();
    shutdown.await;
    readiness.set_stopping();
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
    Ok(())
}

fn socket_for(addr: SocketAddr, kind: socket2::Type) -> io::Result<socket2::Socket> {
    let protocol = if kind == socket2::Type::DGRAM {
        socket2::Protocol::UDP
    } else {
        socket2::Protocol::TCP
    };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv6() {
        // `[::]:53` must not also grab IPv4, or `0.0.0.0:53` beside it fails to bind.
        socket.set_only_v6(true)?;
    }
    // TCP only: a restart must not wait for the old connections' TIME_WAIT, and on Linux the
    // option never lets a second socket bind a port someone listens on. On UDP it would let
    // any local user bind dnsfence's port (>= 1024 needs no privilege) and receive queries.
    if kind == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket_for(addr, socket2::Type::DGRAM)?;
    // A deeper receive queue rides out bursts; failure to raise it is harmless.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into()).map_err(|error| {
        io::Error::new(error.kind(), format!("cannot bind UDP {addr}: {error}"))
    })?;
    UdpSocket::from_std(socket.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket_for(addr, socket2::Type::STREAM)?;
    socket.bind(&addr.into()).map_err(|error| {
        io::Error::new(error.kind(), format!("cannot bind TCP {addr}: {error}"))
    })?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Encodes `response` into at most `max_size` bytes (truncating with TC beyond), as both
/// front ends send it.
pub(crate) fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max_size: u16,
) -> Result<(Vec<u8>, ResponseInfo), NetError> {
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max_size);
    let info = response.destructive_emit(&mut encoder)?;
    Ok((bytes, info))
}

/// Bridges hickory's request type to the pipeline.
pub struct Handler {
    pipeline: Arc<Pipeline>,
    log: QueryLog,
}

impl Handler {
    /// Parses one message from `peer` and answers it through `responder`. A message that is
    /// not a DNS query gets FORMERR (or silence, when not even its header can be read, or when
    /// it is a response: answering responses would make dnsfence a reflector) and is logged as
    /// `malformed` either way.
    pub async fn handle_wire<R: ResponseHandler>(
        &self,
        message: Vec<u8>,
        peer: SocketAddr,
        transport: Transport,
        mut responder: R,
    ) {
        let started = Instant::now();
        let Ok(header) = Header::from_bytes(&message) else {
            self.log_malformed(peer, transport, None, started);
            return;
        };
        if header.metadata.message_type == MessageType::Response {
            self.log_malformed(peer, transport, None, started);
            return;
        }
        let protocol = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        match Request::from_bytes(message, peer, protocol) {
            Ok(request) => {
                self.handle_request::<_, TokioTime>(&request, responder)
                    .await;
            }
            Err(_) => {
                // No question could be read back: the FORMERR carries the header alone.
                let sent = match Queries::read(&mut BinDecoder::new(&[]), 0) {
                    Ok(queries) => {
                        let response = MessageResponseBuilder::new(&queries, None)
                            .error_msg(&header.metadata, ResponseCode::FormErr);
                        responder.send_response(response).await.is_ok()
                    }
                    Err(_) => false,
                };
                let rcode = sent.then_some(ResponseCode::FormErr);
                self.log_malformed(peer, transport, rcode, started);
            }
        }
    }

    fn log_malformed(
        &self,
        peer: SocketAddr,
        transport: Transport,
        rcode: Option<ResponseCode>,
        started: Instant,
    ) {
        let (_, mut record) = self.pipeline.rejected(
            peer,
            transport,
            None,
            rcode.unwrap_or(ResponseCode::FormErr),
            DenyReason::Malformed,
        );
        if rcode.is_none() {
            record.error = Some("not answered".to_owned());
        }
        record.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.log.record(record);
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let client = request.src();
        let transport = match request.protocol() {
            Protocol::Udp => Transport::Udp,
            _ => Transport::Tcp,
        };
        let (reply, mut record) = match question_of(request) {
            Ok(question) => self.pipeline.answer(client, transport, &question).await,
            Err(rejection) => {
                let reason = match rejection {
                    Rejection::OpCode => DenyReason::Opcode,
                    Rejection::Malformed => DenyReason::Malformed,
                    Rejection::Class => DenyReason::Qtype,
                };
                self.pipeline
                    .rejected(client, transport, None, rejection.rcode(), reason)
            }
        };
        if let Some(question) = request.queries.queries().first()
            && record.qname.is_empty()
        {
            record.qname = question.original().name().to_string();
            record.qtype = question.query_type().to_string();
        }

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        metadata.response_code = reply.rcode;
        let edns = request.edns.as_ref().map(|client_edns| {
            let mut edns = Edns::new();
            edns.set_max_payload(client_edns.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            std::iter::empty(),
            reply.soa.iter(),
            std::iter::empty(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, %client, "cannot send the reply");
                record.error = Some(format!("reply not sent: {error}"));
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: failed,
                    counts: HeaderCounts::default(),
                })
            }
        };
        record.truncated = info.truncation;
        record.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.log.record(record);
        info
    }
}
