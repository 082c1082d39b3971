//! The UDP fast path to one upstream: a pool of long-lived sockets, replies matched by ID.
//!
//! hickory-resolver opens, marks, connects and closes a fresh socket for every query, which on
//! a cache miss costs more than everything else dnsfence does (and a conntrack entry each). Here
//! each upstream gets a few connected sockets, opened once with the firewall mark; queries get a
//! random ID, and one receive task per socket hands each reply to the query waiting for that ID.
//! A reply is taken only if it comes from the upstream (the sockets are connected, so the kernel
//! drops anything else), carries a pending ID, is a response to a standard query, and asks
//! exactly the question that was asked; anything else is a failure, never an answer.
//!
//! Truncated replies are not handled here: the caller retries them over TCP through hickory.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

/// Sockets per upstream.
const POOL_SIZE: usize = 8;

/// EDNS buffer advertised to the upstream: large answers come back truncated and go to TCP.
const EDNS_PAYLOAD: u16 = 1232;

/// Queries waiting for a reply, by ID. Each entry carries the token of the query that owns it,
/// so a query that ends removes its own entry and never a later query's that reuses the ID.
type Pending = Arc<Mutex<HashMap<u16, (u64, oneshot::Sender<Vec<u8>>)>>>;

/// Source of the tokens above.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

struct PooledSocket {
    socket: Arc<UdpSocket>,
    pending: Pending,
}

/// A pool of connected, marked UDP sockets to one upstream.
pub struct UdpPool {
    upstream: SocketAddr,
    sockets: Vec<PooledSocket>,
    next: AtomicUsize,
}

impl UdpPool {
    /// Opens the sockets (marked with `mark` unless 0) and starts their receive tasks. Must be
    /// called inside the runtime.
    pub fn open(upstream: SocketAddr, mark: u32) -> io::Result<UdpPool> {
        let mut sockets = Vec::with_capacity(POOL_SIZE);
        for _ in 0..POOL_SIZE {
            let socket = Arc::new(marked_socket(upstream, mark)?);
            let pending: Pending = Arc::default();
            tokio::spawn(receive(socket.clone(), pending.clone()));
            sockets.push(PooledSocket { socket, pending });
        }
        Ok(UdpPool {
            upstream,
            sockets,
            next: AtomicUsize::new(0),
        })
    }

    /// Asks `name`/`qtype` and waits for the matching reply (the caller bounds the wait).
    pub async fn exchange(&self, name: &Name, qtype: RecordType) -> Result<Message, String> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.sockets.len().max(1);
        let Some(pooled) = self.sockets.get(index) else {
            return Err("no socket to the upstream".to_owned());
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let waiting = Waiting::register(&pooled.pending, reply_tx)
            .ok_or_else(|| "too many queries waiting on one upstream socket".to_owned())?;
        let mut query = Message::query();
        query.metadata.id = waiting.id;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name.clone(), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        query.set_edns(edns);
        let bytes = query
            .to_vec()
            .map_err(|error| format!("cannot encode the query: {error}"))?;
        pooled
            .socket
            .send(&bytes)
            .await
            .map_err(|error| format!("{}: {error}", self.upstream))?;
        let mut reply_rx = reply_rx;
        loop {
            let reply = reply_rx
                .await
                .map_err(|_| "the upstream socket closed".to_owned())?;
            let message = Message::from_vec(&reply)
                .map_err(|error| format!("{} sent a malformed reply: {error}", self.upstream))?;
            match check_reply(&message, waiting.id, name, qtype) {
                Ok(()) => return Ok(message),
                // A late reply to an earlier query that had this ID before it gave up: not
                // ours, so keep waiting for ours (the caller's deadline still holds).
                Err(Mismatch::Question) => match waiting.rearm() {
                    Some(next) => reply_rx = next,
                    None => return Err("too many queries waiting on one upstream socket".into()),
                },
                Err(Mismatch::Other(why)) => return Err(format!("{} {why}", self.upstream)),
            }
        }
    }
}

/// A query's slot in a socket's pending map; freed when the query ends however it ends.
struct Waiting {
    pending: Pending,
    id: u16,
    token: u64,
}

impl Waiting {
    fn register(pending: &Pending, reply: oneshot::Sender<Vec<u8>>) -> Option<Waiting> {
        let mut map = pending.lock().ok()?;
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        // Random IDs: with the socket's random port, what an off-path spoofer must guess.
        for _ in 0..16 {
            let id: u16 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(id) {
                slot.insert((token, reply));
                return Some(Waiting {
                    pending: pending.clone(),
                    id,
                    token,
                });
            }
        }
        None
    }
}

impl Waiting {
    /// Waits again on the same ID after a reply that was not for this query.
    fn rearm(&self) -> Option<oneshot::Receiver<Vec<u8>>> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let mut map = self.pending.lock().ok()?;
        match map.entry(self.id) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((self.token, reply_tx));
                Some(reply_rx)
            }
            std::collections::hash_map::Entry::Occupied(_) => None,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pending.lock()
            && map
                .get(&self.id)
                .is_some_and(|(token, _)| *token == self.token)
        {
            map.remove(&self.id);
        }
    }
}

/// Why a reply is not the answer to the query waiting for its ID.
enum Mismatch {
    /// It answers another question: a late reply to an earlier user of the ID.
    Question,
    Other(&'static str),
}

fn check_reply(message: &Message, id: u16, name: &Name, qtype: RecordType) -> Result<(), Mismatch> {
    if message.metadata.id != id {
        return Err(Mismatch::Other("answered with another ID"));
    }
    if message.metadata.message_type != MessageType::Response {
        return Err(Mismatch::Other("sent a query instead of a response"));
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(Mismatch::Other("answered with another opcode"));
    }
    match message.queries.as_slice() {
        [query]
            if query.name() == name
                && query.query_type() == qtype
                && query.query_class() == DNSClass::IN =>
        {
            Ok(())
        }
        _ => Err(Mismatch::Question),
    }
}

/// Hands every datagram to the query waiting for its ID; the rest is dropped.
async fn receive(socket: Arc<UdpSocket>, pending: Pending) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let len = match socket.recv(&mut buf).await {
            Ok(len) => len,
            // ICMP errors (port unreachable while the upstream is down) surface here.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(error) => {
                tracing::warn!(%error, "upstream socket failed; its queries will time out");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(id) = buf.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            continue;
        };
        let waiter = pending.lock().ok().and_then(|mut map| map.remove(&id));
        if let (Some((_, waiter)), Some(reply)) = (waiter, buf.get(..len)) {
            let _ = waiter.send(reply.to_vec());
        }
    }
}

fn marked_socket(upstream: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    super::upstream::set_mark(socket2::SockRef::from(&socket), mark)?;
    // Replies for many queries share this socket: a deep queue rides out bursts (best effort).
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    let any: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&any.into())?;
    socket.connect(&upstream.into())?;
    UdpSocket::from_std(socket.into())
}
