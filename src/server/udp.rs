//! DNS over UDP: receive loops (one per runtime worker, all on the one socket) reading and
//! answering datagrams in batches; a task per datagram that has to wait.
//!
//! The loop waits until the socket is readable, then takes up to [`BATCH`] datagrams with one
//! `recvmmsg` (`mmsg.rs`). Each datagram first meets the fast path ([`Handler::answer_fast`]):
//! a denial or a cache hit whose addresses the firewall holds is answered from the datagram's
//! bytes into a reply buffer of its own, without a task. Once the whole batch is through, its
//! fast replies leave together with one `sendmmsg`, and only then is each one's log record
//! written ([`Handler::finish`], with that datagram's own send result and latency). Under load
//! a batch is full and a query costs a thirty-second of the two system calls; when queries
//! trickle in one by one, a batch holds one datagram and nothing waits for company.
//!
//! A query that does wait (for an upstream, or for the kernel to acknowledge its addresses)
//! continues as a task of its own, tracked so that shutdown waits for it. Those tasks are
//! capped, and a datagram arriving when every slot is taken is dropped (the client retries, as
//! it would after any loss) instead of queueing memory without bound.
//!
//! Back-pressure: when the socket's send buffer is full, the loop waits for room before it
//! reads again, so a flood meets a full receive queue (and kernel drops) instead of a queue of
//! ours. Replies are encoded against the smaller of the client's EDNS buffer and 1232 bytes
//! (512 without EDNS), so a large answer is truncated with TC, never fragmented. A datagram
//! from port 0 is ignored (no reply can reach it).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Waker};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use super::mmsg::{BATCH, Batch};
use super::{Handler, Pending};
use crate::pipeline::Transport;
use crate::stage_times::{Span, Stage};

/// Datagrams being handled at once, per socket.
pub const MAX_PENDING: usize = 4096;

/// A fast reply waiting in the batch for `sendmmsg`.
struct Answered {
    peer: SocketAddr,
    pending: Pending,
}

/// Receives on `socket` until `shutdown` changes. Several loops may read one socket (each
/// batch goes to whichever loop the kernel hands it); `pending` holds the socket's slots for
/// datagrams that wait, shared by its loops ([`MAX_PENDING`]).
pub async fn serve_udp(
    socket: Arc<UdpSocket>,
    handler: Arc<Handler>,
    pending: Arc<Semaphore>,
    tasks: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Batch::new();
    let mut answered: Vec<Answered> = Vec::with_capacity(BATCH);
    let mut results: Vec<io::Result<()>> = Vec::with_capacity(BATCH);
    loop {
        let readable = tokio::select! {
            readable = socket.readable() => readable,
            _ = shutdown.changed() => return,
        };
        if let Err(error) = readable {
            tracing::debug!(%error, "UDP socket failed");
            continue;
        }
        let received = match socket.try_io(Interest::READABLE, || batch.receive(&socket)) {
            Ok(received) => received,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                // ICMP errors from earlier replies surface here; they concern no one now.
                tracing::debug!(%error, "UDP receive failed");
                continue;
            }
        };
        for index in 0..received {
            let Some((datagram, peer, reply)) = batch.datagram(index, answered.len()) else {
                continue;
            };
            if peer.port() == 0 {
                continue;
            }
            if let Some(pending) = handler.answer_fast(datagram, peer, Transport::Udp, reply) {
                answered.push(Answered { peer, pending });
                continue;
            }
            fall_through(datagram, peer, &socket, &handler, &tasks, &pending);
        }
        if answered.is_empty() {
            continue;
        }
        batch.set_peers(answered.iter().map(|answered| answered.peer));
        send_replies(&socket, &batch, &mut results).await;
        for (Answered { peer, pending }, sent) in answered.drain(..).zip(results.drain(..)) {
            let sent = sent.map_err(|error| format!("UDP send to {peer}: {error}"));
            handler.finish(pending, sent);
        }
    }
}

/// Sends the batch's replies (reply buffer `i` to peer `i`) with as few `sendmmsg` calls as it
/// takes; `results[i]` is reply `i`'s own outcome. A full send buffer makes it wait for room
/// (the loop reads nothing meanwhile, so a flood meets back-pressure instead of a queue); an
/// error on one reply costs only that reply.
async fn send_replies(socket: &UdpSocket, batch: &Batch, results: &mut Vec<io::Result<()>>) {
    results.clear();
    while results.len() < batch.peer_count() {
        let first = results.len();
        match socket.try_io(Interest::WRITABLE, || batch.send(socket, first)) {
            Ok(0) => {
                // Nothing sent and no error: never seen, but never loop on it.
                results.push(Err(io::Error::other("sendmmsg sent nothing")));
            }
            Ok(sent) => results.extend((0..sent).map(|_| Ok(()))),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if let Err(error) = socket.writable().await {
                    results.push(Err(error));
                }
            }
            // The kernel reports the error of the first reply it could not send.
            Err(error) => results.push(Err(error)),
        }
    }
}

/// Takes `datagram` to the full path: run here until it has to wait (if ever); only then does
/// it become a task (at most [`MAX_PENDING`] per socket; beyond, the datagram is dropped).
fn fall_through(
    datagram: &[u8],
    peer: SocketAddr,
    socket: &Arc<UdpSocket>,
    handler: &Arc<Handler>,
    tasks: &TaskTracker,
    pending: &Arc<Semaphore>,
) {
    let Ok(permit) = pending.clone().try_acquire_owned() else {
        tracing::debug!(%peer, "UDP overload: datagram dropped");
        return;
    };
    let message = datagram.to_vec();
    let handler = handler.clone();
    let socket = socket.clone();
    let mut query = Box::pin(async move {
        let mut reply = Vec::with_capacity(512);
        let pending = handler
            .answer(message, peer, Transport::Udp, &mut reply)
            .await;
        let sending = Span::start();
        let sent = if reply.is_empty() {
            Ok(())
        } else {
            socket
                .send_to(&reply, peer)
                .await
                .map(drop)
                .map_err(|error| format!("UDP send to {peer}: {error}"))
        };
        sending.end(Stage::ReplySend);
        handler.finish(pending, sent);
        drop(permit);
    });
    // The task polls it again at once, with its own waker, so no wake-up is lost.
    if query
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
    {
        tasks.spawn(query);
    }
}

#[cfg(test)]
#[path = "udp_tests.rs"]
mod udp_tests;
