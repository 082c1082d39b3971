//! One question to one upstream over UDP, from a socket of its own.
//!
//! Every question gets a fresh socket on a source port the kernel draws at random (as Unbound's
//! `outgoing-range` and dnsmasq do), a random ID and a random letter case, so an off-path
//! forger must guess all three at once, and the socket is closed when the question completes.
//! A long-lived pool cannot offer that: with a few fixed ports the port adds a few bits, and a
//! pool re-bound often enough to look random costs the same socket per query anyway. Measured
//! here (loopback, one core): opening, connecting and closing a socket costs about 10-14 µs,
//! a round trip on an open one about 15 µs; the per-query socket also saves the hand-off from a
//! shared receive task to the waiting query and the lock around the pending-ID map.
//!
//! A datagram lost on the way is sent again after a short wait, doubling, **from the same
//! socket with the same ID and case**: every copy asks the same thing, so the answer to the
//! first copy is as good as the answer to the last, and an upstream that answers after 1.5 s
//! is heard even though the question was re-sent twice meanwhile. Keeping one ID per question
//! also means re-sending gives a forger nothing new to aim at.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::socket;
use super::wire::OutgoingQuery;
use crate::stage_times::{Span, Stage};

/// Largest datagram read; the query advertises 1,232 bytes, some upstreams send up to 4,096.
const RECEIVE_BUFFER: usize = 4096;

/// How a question to one upstream over UDP ended.
pub enum UdpOutcome {
    /// A reply that passed every check (it may still be truncated or carry an error rcode).
    Reply(Message),
    /// No acceptable reply by the deadline; the text says why (and what was ignored).
    TimedOut(String),
    /// The upstream is unreachable or the socket failed.
    Failed(String),
}

/// Asks `question` of `upstream` until an acceptable reply arrives or `deadline` passes,
/// re-sending after `first_retransmit`, then twice as long each time.
pub async fn ask(
    upstream: SocketAddr,
    mark: u32,
    question: &OutgoingQuery,
    first_retransmit: Duration,
    deadline: Instant,
) -> UdpOutcome {
    let mut query = question.clone();
    query.randomize(true);
    let opening = Span::start();
    let socket = match socket::udp(upstream, mark) {
        Ok(socket) => socket,
        Err(error) => return UdpOutcome::Failed(format!("socket to {upstream}: {error}")),
    };
    opening.end(Stage::UpstreamSocket);
    let asked = Span::start();
    let mut exchange = Exchange {
        socket,
        query,
        upstream,
        buf: vec![0; RECEIVE_BUFFER],
        ignored: 0,
        last_rejection: None,
    };
    let mut wait = first_retransmit;
    let mut resend_at = Instant::now();
    loop {
        if Instant::now() >= resend_at {
            if let Err(error) = exchange.socket.send(exchange.query.bytes()).await {
                return UdpOutcome::Failed(format!("{upstream}: {error}"));
            }
            resend_at = Instant::now() + wait;
            wait = wait.saturating_mul(2);
        }
        tokio::select! {
            reply = exchange.reply() => {
                asked.end(Stage::UpstreamReply);
                return reply;
            }
            () = tokio::time::sleep_until(resend_at.min(deadline)) => {
                if Instant::now() >= deadline {
                    return UdpOutcome::TimedOut(exchange.timeout_reason());
                }
            }
        }
    }
}

struct Exchange {
    socket: UdpSocket,
    query: OutgoingQuery,
    upstream: SocketAddr,
    buf: Vec<u8>,
    /// Datagrams that came from the upstream's address but were not the answer.
    ignored: u32,
    last_rejection: Option<&'static str>,
}

impl Exchange {
    /// The next datagram that is the answer; others are counted and ignored.
    async fn reply(&mut self) -> UdpOutcome {
        loop {
            let len = match self.socket.recv(&mut self.buf).await {
                Ok(len) => len,
                // ICMP port unreachable: nothing listens there, no use waiting.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return UdpOutcome::Failed(format!(
                        "{} refused the query (port unreachable)",
                        self.upstream
                    ));
                }
                Err(error) => return UdpOutcome::Failed(format!("{}: {error}", self.upstream)),
            };
            let datagram = self.buf.get(..len).unwrap_or_default();
            if let Err(rejected) = self.query.check(datagram) {
                self.ignore(rejected.as_str());
                continue;
            }
            match Message::from_vec(datagram) {
                Ok(message) => return UdpOutcome::Reply(message),
                Err(_) => self.ignore("malformed"),
            }
        }
    }

    fn ignore(&mut self, why: &'static str) {
        self.ignored = self.ignored.saturating_add(1);
        self.last_rejection = Some(why);
    }

    fn timeout_reason(&self) -> String {
        match self.last_rejection {
            None => format!("{} did not answer in time", self.upstream),
            Some(why) => format!(
                "{} did not answer in time ({} replies ignored, the last with {why})",
                self.upstream, self.ignored
            ),
        }
    }
}
