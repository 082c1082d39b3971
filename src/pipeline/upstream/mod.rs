//! Stage 3: forward an allowed question to the trusted resolvers.
//!
//! ```text
//!              ┌─ cache hit ───────────────────────────────────────────────► answer
//! resolve() ───┤
//!              └─ miss ─► flight (one per question in flight) ─► upstreams ─► answer (+ cache)
//!                          later askers of the same question      udp.rs: own socket, port,
//!                          wait for the first one's answer        ID and case per question
//!                                                                 tcp.rs: truncated answers
//! ```
//!
//! Every query is a fresh message built here ([`wire`]): the upstream never sees the client's
//! ID, bytes, EDNS options (client subnet, cookies) or letter case, only dnsfence's. The
//! upstreams are tried in the policy's order, each within its share of `upstream_timeout`, so
//! the log can name the one that answered.
//!
//! Identical questions in flight at the same time are asked once: the first asker runs the
//! query, the others wait for its outcome (each client still gets its own reply, admission and
//! log line from the rest of the pipeline). A flood of clients asking one uncached name costs
//! the upstream one query.
//!
//! Every socket to an upstream carries the policy's firewall mark ([`socket`]).
//!
//! The modules form a tree without cycles: `answer` and `wire` are leaves, `socket` is a leaf,
//! `cache` knows `answer`, `udp` knows `wire` and `socket`, `tcp` knows `answer` and `socket`,
//! and this facade knows them all.

mod answer;
pub mod cache;
mod socket;
mod tcp;
mod udp;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_resolver::net::NetError;
use tokio::sync::OnceCell;

pub use answer::{UpstreamAnswer, UpstreamFailure};
use cache::AnswerCache;
use tcp::TcpClient;
use udp::UdpOutcome;
use wire::OutgoingQuery;

/// How long the first UDP attempt waits before the question is sent again; each next attempt
/// waits twice as long.
const FIRST_RETRANSMIT: Duration = Duration::from_millis(400);

/// Fewer source ports than this and the port adds too little to the ID (RFC 5452 asks for as
/// large a range as practicable).
const MIN_PORT_RANGE: u32 = 16_384;

type Key = (Name, RecordType);

/// One question being asked upstream, shared by everyone who asks it meanwhile.
struct Flight {
    key: Key,
    outcome: OnceCell<Result<UpstreamAnswer, UpstreamFailure>>,
}

/// One trusted resolver.
struct Server {
    addr: SocketAddr,
    tcp: TcpClient,
}

/// The ordered set of trusted resolvers and the answer cache in front of them.
pub struct Upstreams {
    servers: Vec<Server>,
    mark: u32,
    cache: AnswerCache,
    flights: Mutex<HashMap<Key, Arc<Flight>>>,
    per_upstream: Duration,
    total_timeout: Duration,
}

impl Upstreams {
    /// Prepares the clients of every upstream. `mark` is put on every socket (0: none). Must
    /// be called inside the tokio runtime.
    pub fn new(
        upstreams: &[SocketAddr],
        total_timeout: Duration,
        mark: u32,
    ) -> Result<Upstreams, NetError> {
        // Leave every upstream a fair share of the total, so the last one is still tried.
        let count = u32::try_from(upstreams.len().max(1)).unwrap_or(u32::MAX);
        let per_upstream = (total_timeout / count).max(Duration::from_millis(50));
        let mut servers = Vec::with_capacity(upstreams.len());
        for &addr in upstreams {
            servers.push(Server {
                addr,
                tcp: TcpClient::new(addr, per_upstream, mark)?,
            });
        }
        if let Some((low, high)) = socket::local_port_range()
            && u32::from(high) - u32::from(low) + 1 < MIN_PORT_RANGE
        {
            tracing::warn!(
                low,
                high,
                "net.ipv4.ip_local_port_range offers fewer than {MIN_PORT_RANGE} source ports \
                 for upstream queries; widen it (e.g. 32768 60999) so forged answers stay \
                 unguessable"
            );
        }
        Ok(Upstreams {
            servers,
            mark,
            cache: AnswerCache::default(),
            flights: Mutex::default(),
            per_upstream,
            total_timeout,
        })
    }

    /// Resolves `name`/`qtype` (the name as it is to be sent: lower case), from the cache or
    /// the upstreams, within the total timeout.
    pub async fn resolve(
        &self,
        name: &Name,
        qtype: RecordType,
    ) -> Result<UpstreamAnswer, UpstreamFailure> {
        if let Some(hit) = self.cache.get(name, qtype, Instant::now()) {
            return Ok(hit);
        }
        let seat = self.board(name, qtype);
        seat.flight
            .outcome
            .get_or_init(|| self.ask(name, qtype))
            .await
            .clone()
    }

    /// Joins the flight for this question, starting one if there is none.
    fn board(&self, name: &Name, qtype: RecordType) -> Seat<'_> {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (name.clone(), qtype);
        let flight = flights
            .entry(key)
            .or_insert_with_key(|key| {
                Arc::new(Flight {
                    key: key.clone(),
                    outcome: OnceCell::new(),
                })
            })
            .clone();
        Seat {
            flights: &self.flights,
            flight,
        }
    }

    /// Asks the upstreams in order, each within its share, all within the total timeout.
    async fn ask(&self, name: &Name, qtype: RecordType) -> Result<UpstreamAnswer, UpstreamFailure> {
        // A flight that just landed may have left its answer in the cache.
        if let Some(hit) = self.cache.get(name, qtype, Instant::now()) {
            return Ok(hit);
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.total_timeout;
        let question = OutgoingQuery::new(name, qtype);
        let mut last = UpstreamFailure {
            upstream: None,
            reason: "no upstream configured".to_owned(),
        };
        for server in &self.servers {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let share_ends = (now + self.per_upstream).min(deadline);
            let outcome = match tokio::time::timeout_at(
                share_ends,
                self.ask_server(server, name, qtype, &question, share_ends),
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(_elapsed) => Err(format!(
                    "{} did not answer within {} ms",
                    server.addr,
                    self.per_upstream.as_millis()
                )),
            };
            match outcome {
                Ok(answer) => {
                    self.cache.put(name, qtype, &answer, Instant::now());
                    return Ok(answer);
                }
                Err(reason) => {
                    last = UpstreamFailure {
                        upstream: Some(server.addr),
                        reason,
                    };
                }
            }
        }
        Err(last)
    }

    /// One upstream's definitive answer (records, NXDOMAIN or NODATA), or why there is none.
    async fn ask_server(
        &self,
        server: &Server,
        name: &Name,
        qtype: RecordType,
        question: &OutgoingQuery,
        deadline: tokio::time::Instant,
    ) -> Result<UpstreamAnswer, String> {
        let message =
            match udp::ask(server.addr, self.mark, question, FIRST_RETRANSMIT, deadline).await {
                UdpOutcome::Reply(message) => message,
                UdpOutcome::Failed(reason) => return Err(reason),
            };
        if message.metadata.truncation {
            return server.tcp.query(name, qtype).await;
        }
        definitive(server.addr, message)
    }
}

/// The answer in `message`, if it is one: records, NXDOMAIN or NODATA with their SOA.
fn definitive(upstream: SocketAddr, message: Message) -> Result<UpstreamAnswer, String> {
    let rcode = message.metadata.response_code;
    if !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
        return Err(format!("{upstream} answered {rcode}"));
    }
    let Message {
        answers,
        authorities,
        ..
    } = message;
    Ok(UpstreamAnswer {
        upstream,
        rcode,
        answers,
        soa: authorities
            .into_iter()
            .find(|r| r.record_type() == hickory_proto::rr::RecordType::SOA),
    })
}

/// One asker's place on a flight. The flight leaves the map when it has its outcome (later
/// askers go to the cache or start a new one) or when its last asker gives up.
struct Seat<'a> {
    flights: &'a Mutex<HashMap<Key, Arc<Flight>>>,
    flight: Arc<Flight>,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = flights
            .get(&self.flight.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight));
        // Clones are made only under this lock: two references are the map's and ours.
        if ours && (self.flight.outcome.initialized() || Arc::strong_count(&self.flight) <= 2) {
            flights.remove(&self.flight.key);
        }
    }
}
