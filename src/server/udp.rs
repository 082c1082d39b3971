//! DNS over UDP: one receive loop per socket; a task per datagram that has to wait.
//!
//! Each datagram first meets the fast path ([`Handler::answer_fast`]): a denial or a cache hit
//! whose addresses the firewall holds is answered from the datagram's bytes into one reused
//! buffer, and sent, before the next datagram is read. The rest go on as below.
//!
//! The receive loop asks the [`Handler`](super::Handler) for each datagram's reply and sends
//! it. Most queries (cache hits whose addresses the kernel acknowledged moments ago, every
//! local denial) never wait for anything: they are answered right there, in the loop, without
//! a task. A query that does wait (for an upstream, or for the kernel to acknowledge its
//! addresses) continues as a task of its own, tracked so that shutdown waits for it. Those tasks
//! are capped, and a datagram arriving when every slot is taken is dropped (the client retries,
//! as it would after any loss) instead of queueing memory without bound. Replies are encoded
//! against the smaller of the client's EDNS buffer and 1232 bytes (512 without EDNS), so a large
//! answer is truncated with TC, never fragmented.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Waker};

use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use super::Handler;
use crate::pipeline::Transport;

/// Datagrams being handled at once, per socket.
pub const MAX_PENDING: usize = 4096;

/// Largest datagram read; a DNS message over UDP cannot be larger.
const MAX_DATAGRAM: usize = 65_535;

/// Receives on `socket` until `shutdown` changes.
pub async fn serve_udp(
    socket: Arc<UdpSocket>,
    handler: Arc<Handler>,
    tasks: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // The fast path's replies, one after another, in one buffer.
    let mut fast_reply = Vec::with_capacity(usize::from(super::MAX_UDP_PAYLOAD));
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            _ = shutdown.changed() => return,
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier replies surface here; they concern no one now.
                tracing::debug!(%error, "UDP receive failed");
                continue;
            }
        };
        if peer.port() == 0 {
            continue;
        }
        let datagram = buf.get(..len).unwrap_or_default();
        if let Some(pending) = handler.answer_fast(datagram, peer, Transport::Udp, &mut fast_reply)
        {
            let sent = match socket.try_send_to(&fast_reply, peer) {
                Ok(_) => Ok(()),
                // A full socket buffer: wait for room (the loop reads nothing meanwhile, so a
                // flood meets back-pressure instead of a queue).
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    socket.send_to(&fast_reply, peer).await.map(drop)
                }
                Err(error) => Err(error),
            }
            .map_err(|error| format!("UDP send to {peer}: {error}"));
            handler.finish(pending, sent);
            continue;
        }
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "UDP overload: datagram dropped");
            continue;
        };
        let message = datagram.to_vec();
        let handler = handler.clone();
        let socket = socket.clone();
        let mut query = Box::pin(async move {
            let mut reply = Vec::with_capacity(512);
            let pending = handler
                .answer(message, peer, Transport::Udp, &mut reply)
                .await;
            let sent = if reply.is_empty() {
                Ok(())
            } else {
                socket
                    .send_to(&reply, peer)
                    .await
                    .map(drop)
                    .map_err(|error| format!("UDP send to {peer}: {error}"))
            };
            handler.finish(pending, sent);
            drop(permit);
        });
        // Run it here until it has to wait (if ever); only then does it become a task. The
        // task polls it again at once, with its own waker, so no wake-up is lost.
        if query
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
        {
            tasks.spawn(query);
        }
    }
}
