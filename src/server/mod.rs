//! The DNS server: listeners, the handler that answers each message, and graceful shutdown.
//!
//! Every listen address gets a UDP socket (`udp.rs`: one receive loop per runtime worker,
//! datagrams read and fast replies sent in batches of up to 32 per system call with
//! `recvmmsg`/`sendmmsg` (`mmsg.rs`), a bounded task per datagram that has to wait) and a TCP listener (`tcp.rs`: connection limits, slowloris deadlines, pipelining). Both move bytes
//! only: each message goes to [`Handler::answer`] (`handler.rs`), which parses it, runs the
//! [`Pipeline`](crate::pipeline::Pipeline) and writes the reply's bytes; the front end sends
//! them and calls [`Handler::finish`], which writes the log record (with the truncation flag
//! and the real latency).
//!
//! Every task the server spawns (a datagram being answered, a TCP connection, a query of a
//! pipelined connection) is tracked: at shutdown the listeners stop first, then the server
//! waits (at most [`DRAIN_DEADLINE`]) for the queries already accepted to be answered and
//! logged.
//!
//! Listening sockets are dnsfence's alone: `SO_REUSEADDR` only on TCP (restarts past
//! TIME_WAIT; on Linux it never lets a second socket bind a listening TCP port) and never
//! `SO_REUSEPORT`, so no other local process, of another user or of dnsfence's own, can bind
//! the port and read or answer queries.
//!
//! Scaling with cores therefore does not take one socket per core: each UDP socket is read by
//! as many receive loops as the runtime has workers (one per core the process may run on), and
//! the kernel hands each `recvmmsg` whatever is waiting to whichever loop asks. A
//! `SO_REUSEPORT` group would spare the loops their shared receive queue, but it cannot be
//! closed to newcomers: a process of the same uid can join it, and (measured on Linux 6.18) a
//! classic BPF program choosing among dnsfence's own sockets keeps a plain newcomer out, yet a
//! newcomer that also sets `SO_BINDTODEVICE` (no privilege needed since Linux 5.7) or
//! `connect()`s to a client's address wins the socket lookup outright and receives every query
//! arriving on that device, or from that client. Without `SO_REUSEPORT` all of them fail to
//! bind (`tests/hardening.rs` checks it for root and for another user).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use crate::health::Readiness;
use crate::pipeline::Pipeline;
use crate::querylog::QueryLog;
pub use handler::{Handler, Pending};
pub use tcp::TcpLimits;

mod handler;
mod mmsg;
mod tcp;
mod udp;

/// Largest UDP reply: the DNS Flag Day 2020 size, which fits every common path MTU, so replies
/// are truncated (TC) and retried over TCP rather than fragmented.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// How long shutdown waits for the queries already accepted (an upstream that does not answer
/// costs at most the upstream timeout; a TCP client that does not read, the write deadline).
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

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
    let handler = Arc::new(Handler::new(pipeline, log));
    let (stop, stopped) = watch::channel(false);
    let tasks = TaskTracker::new();
    // One receive loop per worker on each UDP socket, so that every core can read datagrams.
    let readers = tokio::runtime::Handle::current()
        .metrics()
        .num_workers()
        .max(1);
    let mut listeners = Vec::with_capacity(listen.len() * (readers + 1));
    for &addr in listen {
        let socket = Arc::new(bind_udp(addr)?);
        let listener = bind_tcp(addr)?;
        let pending = Arc::new(Semaphore::new(udp::MAX_PENDING));
        for _ in 0..readers {
            listeners.push(tokio::spawn(udp::serve_udp(
                socket.clone(),
                handler.clone(),
                pending.clone(),
                tasks.clone(),
                stopped.clone(),
            )));
        }
        listeners.push(tokio::spawn(tcp::serve_tcp(
            listener,
            handler.clone(),
            tcp_limits,
            tasks.clone(),
            stopped.clone(),
        )));
        tracing::info!(%addr, udp_readers = readers, "listening on UDP and TCP");
    }
    readiness.set_listeners_bound();
    shutdown.await;
    readiness.set_stopping();
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for listener in listeners {
        let _ = listener.await;
    }
    tasks.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tasks.len(),
            "queries still unanswered at shutdown after {DRAIN_DEADLINE:?}"
        );
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
