//! dnsfence's own client for DNS over a byte stream (TCP, and TLS on top of it): truncated
//! answers, and upstreams that are only reached over TCP or TLS.
//!
//! One kept-alive connection per upstream carries many questions at once (pipelining, RFC
//! 7766): each question is one message with an ID unique on the connection; a writer task sends
//! the messages in the order they come, a reader task hands each reply to the question waiting
//! for its ID. A reply counts only if it passes the same test as over UDP (the ID, a response
//! to a standard query, exactly the question asked). The client sends exactly the questions
//! the pipeline gives it and nothing else: no follow-up query for a CNAME target, no retry of
//! its own beyond one fresh connection when a kept-alive one turns out to be closed, and no
//! cache of its own (the stage's cache is the only one).
//!
//! The connection is opened on first use, with the firewall mark, and replaced when the
//! upstream closes it. Opening is serialized (a second question waits for the connection the
//! first one is opening, rather than opening another): the only lock held across an await in
//! this module, and only while there is no connection to use.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::socket;
use super::wire::OutgoingQuery;

/// Messages queued for the writer task of one connection.
const WRITE_QUEUE: usize = 1024;

/// Questions waiting on one connection; beyond it a question waits for a slot no longer than
/// its deadline (it fails rather than queueing without bound).
const MAX_PENDING: usize = 4096;

/// A connection with nothing pending is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream to an upstream (a TCP connection, or TLS over one).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

pub type Connecting = Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>>;

/// How to open a stream to an upstream: TCP, or TLS over TCP.
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, upstream: SocketAddr, mark: u32) -> Connecting;
}

/// Plain TCP with the firewall mark.
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial(&self, upstream: SocketAddr, mark: u32) -> Connecting {
        Box::pin(async move {
            let socket = socket::tcp(upstream, mark)?;
            let stream = socket.connect(upstream).await?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    }
}

type Waiters = Arc<Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>>;

/// One open connection.
struct Connection {
    writer: mpsc::Sender<Vec<u8>>,
    waiters: Waiters,
    closed: Arc<AtomicBool>,
    reader: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Asks one upstream over a stream.
pub struct StreamClient {
    addr: SocketAddr,
    mark: u32,
    dialer: Box<dyn Dialer>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl StreamClient {
    pub fn new(addr: SocketAddr, mark: u32, dialer: Box<dyn Dialer>) -> StreamClient {
        StreamClient {
            addr,
            mark,
            dialer,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    /// The reply to `question` (checked), by `deadline`.
    pub async fn ask(
        &self,
        question: &OutgoingQuery,
        deadline: Instant,
    ) -> Result<Message, String> {
        match tokio::time::timeout_at(deadline, self.ask_once(question, true)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                // A connection that let a question time out may be wedged: the next question
                // opens a fresh one (questions still in flight on it keep their answers).
                if let Ok(current) = self.connection.try_lock()
                    && let Some(connection) = current.as_ref()
                {
                    connection.closed.store(true, Ordering::Relaxed);
                }
                Err(format!("{} did not answer over TCP in time", self.addr))
            }
        }
    }

    async fn ask_once(&self, question: &OutgoingQuery, may_retry: bool) -> Result<Message, String> {
        let (connection, fresh) = self.connection().await?;
        let mut query = question.clone();
        let (reply_tx, reply_rx) = oneshot::channel();
        let Some(slot) = Slot::claim(&connection.waiters, &mut query, reply_tx) else {
            return Err(format!("too many questions waiting on {}", self.addr));
        };
        let sent = connection.writer.send(query.bytes().to_vec()).await.is_ok();
        let reply = if sent { reply_rx.await.ok() } else { None };
        drop(slot);
        let Some(reply) = reply else {
            connection.closed.store(true, Ordering::Relaxed);
            // A kept-alive connection the upstream had closed meanwhile: once more, fresh.
            if may_retry && !fresh {
                return Box::pin(self.ask_once(question, false)).await;
            }
            return Err(format!("{} closed the connection", self.addr));
        };
        if let Err(rejected) = query.check(&reply) {
            return Err(format!(
                "{} answered over TCP with {}",
                self.addr,
                rejected.as_str()
            ));
        }
        Message::from_vec(&reply)
            .map_err(|error| format!("{} sent a malformed reply over TCP: {error}", self.addr))
    }

    /// The open connection, opening one if there is none; `true` if it was just opened.
    async fn connection(&self) -> Result<(Arc<Connection>, bool), String> {
        let mut current = self.connection.lock().await;
        if let Some(connection) = current.as_ref()
            && !connection.closed.load(Ordering::Relaxed)
        {
            return Ok((connection.clone(), false));
        }
        *current = None;
        let stream = self
            .dialer
            .dial(self.addr, self.mark)
            .await
            .map_err(|error| format!("cannot connect to {}: {error}", self.addr))?;
        let connection = Arc::new(start(stream));
        *current = Some(connection.clone());
        Ok((connection, true))
    }
}

/// A question's ID on a connection, released however the question ends.
struct Slot {
    waiters: Waiters,
    id: u16,
}

impl Slot {
    /// Gives `query` an ID not in use on the connection and registers `reply` under it.
    fn claim(
        waiters: &Waiters,
        query: &mut OutgoingQuery,
        reply: oneshot::Sender<Vec<u8>>,
    ) -> Option<Slot> {
        let mut map = waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_PENDING {
            return None;
        }
        for _ in 0..64 {
            query.randomize(false);
            let id = query.id();
            if let std::collections::hash_map::Entry::Vacant(entry) = map.entry(id) {
                entry.insert(reply);
                return Some(Slot {
                    waiters: waiters.clone(),
                    id,
                });
            }
        }
        None
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Starts the writer and reader tasks of a new connection.
fn start(stream: Box<dyn Stream>) -> Connection {
    let (mut read_half, mut write_half) = tokio::io::split(stream);
    let (writer, mut queue) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let waiters: Waiters = Arc::default();
    let closed = Arc::new(AtomicBool::new(false));

    let write_closed = closed.clone();
    tokio::spawn(async move {
        while let Some(message) = queue.recv().await {
            let Ok(len) = u16::try_from(message.len()) else {
                continue;
            };
            let mut frame = Vec::with_capacity(message.len() + 2);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&message);
            if write_half.write_all(&frame).await.is_err() || write_half.flush().await.is_err() {
                write_closed.store(true, Ordering::Relaxed);
                break;
            }
        }
        let _ = write_half.shutdown().await;
    });

    let (read_waiters, read_closed) = (waiters.clone(), closed.clone());
    let reader = tokio::spawn(async move {
        loop {
            let idle = read_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
            let mut len = [0u8; 2];
            let read = if idle {
                match tokio::time::timeout(IDLE_TIMEOUT, read_half.read_exact(&mut len)).await {
                    Ok(read) => read,
                    Err(_idle) => break,
                }
            } else {
                read_half.read_exact(&mut len).await
            };
            if read.is_err() {
                break;
            }
            let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if read_half.read_exact(&mut message).await.is_err() {
                break;
            }
            let Some(&[hi, lo]) = message.get(..2) else {
                continue;
            };
            let waiter = read_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&u16::from_be_bytes([hi, lo]));
            if let Some(waiter) = waiter {
                let _ = waiter.send(message);
            }
        }
        read_closed.store(true, Ordering::Relaxed);
        // Every question still waiting learns the connection is gone.
        read_waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    });
    Connection {
        writer,
        waiters,
        closed,
        reader,
    }
}
