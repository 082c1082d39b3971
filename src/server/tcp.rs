//! DNS over TCP, with the limits a hostile client cannot talk its way around.
//!
//! hickory-server's own TCP listener accepts any number of connections and answers the queries
//! of one connection strictly one after another, with only an idle timeout. This front end
//! hands each message to the [`Handler`](super::Handler) and adds what a resolver facing an
//! adversary needs:
//! - a cap on open connections (beyond it, new ones are closed at once, so the listen backlog
//!   never fills with attackers' connections);
//! - an idle timeout between messages and a separate, short deadline for the rest of a message
//!   once its first byte arrived, so a slowloris client dribbling one byte at a time is cut off;
//! - pipelining (RFC 7766): queries of one connection are answered concurrently, each with its
//!   own ID and question, up to a per-connection bound.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::Handler;
use crate::pipeline::Transport;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;

/// Length of a DNS header; a shorter message is not a message.
const HEADER_LEN: usize = 12;

/// Queries of one connection being answered at once.
pub const PIPELINE_DEPTH: usize = 32;

/// Once the first byte of a message has arrived, the rest must follow within this time.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(2);

/// Prefixes a DNS message with its 16-bit length (RFC 1035 4.2.2).
fn frame(message: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(message.len()).ok()?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    Some(framed)
}

/// Limits of the TCP front end.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub idle_timeout: Duration,
}

/// Accepts connections on `listener` until `shutdown` changes.
pub async fn serve_tcp(
    listener: TcpListener,
    handler: Arc<Handler>,
    limits: TcpLimits,
    tasks: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    // One client may hold only its share of the slots, so a single agent cannot deny TCP (and
    // with it every truncated answer) to the others.
    let per_client = limits.max_connections_per_client.max(1);
    let open_by_client: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "TCP connection limit reached; closing");
            drop(stream);
            continue;
        };
        // The pipeline's identity, not the raw peer: a local process may bind every address
        // of this host, and each must not bring it another share.
        let client = handler.client_identity(peer.ip());
        let Some(client_slot) = ClientSlot::take(&open_by_client, client, per_client) else {
            tracing::debug!(%peer, "TCP connections per client limit reached; closing");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let connection_tasks = tasks.clone();
        tasks.spawn(async move {
            serve_connection(stream, peer, handler, limits, connection_tasks, shutdown).await;
            drop(client_slot);
            drop(permit);
        });
    }
}

/// One client's share of the connection slots, given back on drop.
struct ClientSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl ClientSlot {
    fn take(
        open: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        client: IpAddr,
        max: usize,
    ) -> Option<ClientSlot> {
        let mut counts = open.lock().ok()?;
        let count = counts.entry(client).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            open: open.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.open.lock()
            && let Some(count) = counts.get_mut(&self.client)
        {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<Handler>,
    limits: TcpLimits,
    tasks: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (replies, mut outgoing) = mpsc::channel::<Vec<u8>>(PIPELINE_DEPTH);
    // A client that stops reading must not keep its slot: each reply has a deadline, and when
    // the writer gives up the whole connection ends.
    let mut writer_task = tokio::spawn(async move {
        while let Some(framed) = outgoing.recv().await {
            let written = tokio::time::timeout(MESSAGE_DEADLINE, writer.write_all(&framed)).await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut writer_done = false;
    let in_flight = Arc::new(Semaphore::new(PIPELINE_DEPTH));
    loop {
        let mut first = [0u8; 1];
        let read_first = tokio::select! {
            read = tokio::time::timeout(limits.idle_timeout, reader.read_exact(&mut first)) => read,
            _ = shutdown.changed() => break,
            _ = &mut writer_task => {
                writer_done = true;
                break;
            }
        };
        if !matches!(read_first, Ok(Ok(_))) {
            break;
        }
        let message = tokio::time::timeout(MESSAGE_DEADLINE, async {
            let second = reader.read_u8().await?;
            let len = usize::from(u16::from_be_bytes([first[0], second]));
            let mut buf = vec![0u8; len];
            reader.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        })
        .await;
        let Ok(Ok(message)) = message else {
            tracing::debug!(%peer, "TCP message incomplete within the deadline; closing");
            break;
        };
        // Not even a header: nothing to answer, and answering nothing would let a client keep
        // its connection alive forever with a byte or two per idle period.
        if message.len() < HEADER_LEN {
            break;
        }
        // All slots taken means replies are not being read: wait no longer than a write may.
        let permit = tokio::select! {
            permit = tokio::time::timeout(MESSAGE_DEADLINE, in_flight.clone().acquire_owned()) => permit,
            _ = &mut writer_task => {
                writer_done = true;
                break;
            }
        };
        let Ok(Ok(permit)) = permit else {
            break;
        };
        let handler = handler.clone();
        let replies = replies.clone();
        tasks.spawn(async move {
            let mut reply = Vec::with_capacity(512);
            let pending = match handler.answer_fast(&message, peer, Transport::Tcp, &mut reply) {
                Some(pending) => pending,
                None => {
                    handler
                        .answer(message, peer, Transport::Tcp, &mut reply)
                        .await
                }
            };
            let sent = if reply.is_empty() {
                Ok(())
            } else {
                match frame(&reply) {
                    Some(framed) => replies
                        .send(framed)
                        .await
                        .map_err(|_| "TCP connection closed".to_owned()),
                    None => Err("response longer than 65535 bytes".to_owned()),
                }
            };
            handler.finish(pending, sent);
            drop(permit);
        });
    }
    drop(replies);
    // Let queries already being answered finish and flush their replies, then close for good.
    if !writer_done
        && tokio::time::timeout(Duration::from_secs(5), &mut writer_task)
            .await
            .is_err()
    {
        writer_task.abort();
    }
}
