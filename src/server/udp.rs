//! DNS over UDP: one receive loop per socket, one task per datagram, a bound on both.
//!
//! Each datagram becomes a task that runs the [`Handler`](super::Handler); the number of such
//! tasks is capped, and a datagram arriving when every slot is taken is dropped (the client
//! retries, as it would after any loss) instead of queueing memory without bound. Replies are
//! encoded against the smaller of the client's EDNS buffer and 1232 bytes (512 without EDNS), so
//! a large answer is truncated with TC, never fragmented.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::rr::Record;
use hickory_server::net::NetError;
use hickory_server::server::{ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};

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
    mut shutdown: watch::Receiver<bool>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let mut buf = vec![0u8; MAX_DATAGRAM];
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
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "UDP overload: datagram dropped");
            continue;
        };
        let message = buf[..len].to_vec();
        let handler = handler.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            let responder = UdpResponder { socket, peer };
            handler
                .handle_wire(message, peer, Transport::Udp, responder)
                .await;
            drop(permit);
        });
    }
}

/// Encodes a response within the client's size and sends it back.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // The response carries dnsfence's own EDNS, whose payload size is already the smaller
        // of the client's and ours; without EDNS, RFC 1035's 512 bytes.
        let max_size = response
            .edns()
            .map_or(512, |edns| edns.max_payload().max(512));
        let (bytes, info) = super::encode(response, max_size)?;
        self.socket
            .send_to(&bytes, self.peer)
            .await
            .map_err(|error| NetError::from(format!("UDP send to {}: {error}", self.peer)))?;
        Ok(info)
    }
}
