//! Stage 3: forward an allowed question to the trusted resolvers.
//!
//! ```text
//!              ┌─ cache hit ───────────────────────────────────────────────► answer
//! resolve() ───┤
//!              └─ miss ─► flight (one per question in flight) ─► upstreams ─► answer (+ cache)
//!                          later askers of the same question      udp.rs: own socket, port,
//!                          wait for the first one's answer        ID and case per question
//!                                                                 tcp.rs: truncated answers,
//!                                                                 tcp:// (and tls.rs: tls://)
//! ```
//!
//! Every query is a fresh message built here ([`wire`]): the upstream never sees the client's
//! ID, bytes, EDNS options (client subnet, cookies) or letter case, only dnsfence's. Which
//! upstream is asked first, and when the next one is brought in, is [`health`]'s business; the
//! log names the one that answered.
//!
//! Identical questions in flight at the same time are asked once: the first asker runs the
//! query, the others wait for its outcome (each client still gets its own reply, admission and
//! log line from the rest of the pipeline). A flood of clients asking one uncached name costs
//! the upstream one query.
//!
//! Every socket to an upstream carries the policy's firewall mark ([`socket`]).
//!
//! The modules form a tree without cycles: `answer`, `wire`, `socket` and `health` are leaves,
//! `cache` knows `answer`, `udp` knows `wire` and `socket`, `tcp` knows `wire` and `socket`,
//! `tls` knows `tcp` and `socket`,
//! and this facade knows them all.

mod answer;
pub mod cache;
mod health;
mod socket;
pub mod stats;
mod tcp;
mod tls;
mod udp;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::sync::OnceCell;
use tokio::time::Instant;

pub use answer::{UpstreamAnswer, UpstreamFailure};
use cache::AnswerCache;
use health::Health;
use stats::{Timings, UpstreamStats};
use tcp::{StreamClient, TcpDialer};
use tls::TlsDialer;
use udp::UdpOutcome;
use wire::OutgoingQuery;

use crate::policy::{UpstreamOptions, UpstreamOrder as Order, UpstreamTransport};
use crate::stage_times::{Span, Stage};

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
    /// Whether questions go over UDP first (else over the stream only).
    udp: bool,
    /// TCP (truncated answers, or every question for `tcp://`), or TLS.
    stream: Arc<StreamClient>,
    health: Arc<Health>,
    /// How long its replies took (metrics).
    timings: Timings,
}

/// The trusted resolvers, what is known of their health, and the answer cache in front.
pub struct Upstreams {
    servers: Vec<Server>,
    order: Order,
    mark: u32,
    cache: AnswerCache,
    flights: Mutex<HashMap<Key, Arc<Flight>>>,
    total_timeout: Duration,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// Why one upstream gave no answer to one question.
struct AttemptError {
    reason: String,
}

type AttemptFuture<'a> =
    Pin<Box<dyn Future<Output = Result<UpstreamAnswer, AttemptError>> + Send + 'a>>;

/// A question under way at one upstream.
struct Attempt<'a> {
    server: usize,
    started: Instant,
    rto: Duration,
    /// None once it has ended.
    future: Option<AttemptFuture<'a>>,
}

impl Upstreams {
    /// Prepares the clients of every upstream. `mark` is put on every socket (0: none). Must
    /// be called inside the tokio runtime.
    pub fn new(
        upstreams: &[SocketAddr],
        options: &UpstreamOptions,
        total_timeout: Duration,
        mark: u32,
    ) -> Result<Upstreams, String> {
        let mut servers = Vec::with_capacity(upstreams.len());
        for &addr in upstreams {
            let transport = options.transport(addr);
            let dialer: Box<dyn tcp::Dialer> = match &transport {
                UpstreamTransport::Udp | UpstreamTransport::Tcp => Box::new(TcpDialer),
                UpstreamTransport::Tls { name } => Box::new(
                    TlsDialer::new(name, options.tls_ca.as_deref())
                        .map_err(|error| format!("{addr}: {error}"))?,
                ),
            };
            servers.push(Server {
                addr,
                udp: transport == UpstreamTransport::Udp,
                stream: Arc::new(StreamClient::new(addr, mark, dialer)),
                health: Arc::default(),
                timings: Timings::default(),
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
            order: options.order,
            mark,
            cache: AnswerCache::default(),
            flights: Mutex::default(),
            total_timeout,
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        })
    }

    /// Drops the cached answers whose name `keep` rejects (after a reload denied them).
    pub fn retain_cached(&self, keep: impl Fn(&Name) -> bool) {
        self.cache.retain(keep);
    }

    /// Cache counters and per-upstream reply times, for the metrics endpoint.
    pub fn stats(&self) -> UpstreamStats {
        UpstreamStats {
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            cache_entries: self.cache.len(),
            durations: self
                .servers
                .iter()
                .map(|s| {
                    let (buckets, sum_seconds) = s.timings.snapshot();
                    stats::UpstreamTimings {
                        upstream: s.addr,
                        buckets,
                        sum_seconds,
                    }
                })
                .collect(),
        }
    }

    /// Resolves `name`/`qtype` (the name as it is to be sent: lower case), from the cache or
    /// the upstreams, within the total timeout.
    pub async fn resolve(
        &self,
        name: &Name,
        qtype: RecordType,
    ) -> Result<UpstreamAnswer, UpstreamFailure> {
        if let Some(hit) = self.cache.get(name, qtype, std::time::Instant::now()) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let span = Span::start();
        let seat = self.board(name, qtype);
        let outcome = seat
            .flight
            .outcome
            .get_or_init(|| self.ask(name, qtype))
            .await
            .clone();
        span.end(Stage::Resolve);
        outcome
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

    /// Asks the upstreams, best first. Each one not answering within its retransmission
    /// timeout (or failing) brings the next one in, while the earlier ones stay asked: the
    /// first answer from any of them wins, until the total timeout.
    async fn ask(&self, name: &Name, qtype: RecordType) -> Result<UpstreamAnswer, UpstreamFailure> {
        // A flight that just landed may have left its answer in the cache.
        if let Some(hit) = self.cache.get(name, qtype, std::time::Instant::now()) {
            return Ok(hit);
        }
        let started = Instant::now();
        let deadline = started + self.total_timeout;
        let question = OutgoingQuery::new(name, qtype);
        let healths: Vec<&Health> = self.servers.iter().map(|s| &*s.health).collect();
        let (order, probes) = health::plan(&healths, self.order, started);
        for index in probes {
            self.probe(index, &question, deadline);
        }
        let mut last: Option<UpstreamFailure> = None;
        let mut attempts: Vec<Attempt<'_>> = Vec::with_capacity(order.len());
        let mut waiting = order.iter().copied();
        let mut bring_next_at = started;
        let outcome = loop {
            let now = Instant::now();
            if now >= deadline {
                break None;
            }
            let running = attempts.iter().any(|a| a.future.is_some());
            if now >= bring_next_at || !running {
                if let Some(index) = waiting.next() {
                    let Some(server) = self.servers.get(index) else {
                        continue;
                    };
                    let rto = server.health.rto();
                    attempts.push(Attempt {
                        server: index,
                        started: now,
                        rto,
                        future: Some(Box::pin(self.attempt(server, &question, rto, deadline))),
                    });
                    bring_next_at = now + rto;
                    continue;
                }
                if !running {
                    break None;
                }
                bring_next_at = deadline;
            }
            tokio::select! {
                (index, result) = next_outcome(&mut attempts) => match result {
                    Ok(answer) => break Some(answer),
                    Err(error) => {
                        // No use waiting: bring the next upstream in now.
                        bring_next_at = Instant::now();
                        last = Some(UpstreamFailure {
                            upstream: self.servers.get(index).map(|s| s.addr),
                            reason: error.reason,
                        });
                    }
                },
                () = tokio::time::sleep_until(bring_next_at.min(deadline)) => {}
            }
        };
        // Upstreams asked long enough to have answered, and cut short: they timed out.
        let now = Instant::now();
        for attempt in attempts.iter().filter(|a| a.future.is_some()) {
            if now.duration_since(attempt.started) >= attempt.rto
                && let Some(server) = self.servers.get(attempt.server)
            {
                server.health.failed(now);
                last.get_or_insert_with(|| UpstreamFailure {
                    upstream: Some(server.addr),
                    reason: format!("{} did not answer in time", server.addr),
                });
            }
        }
        match outcome {
            Some(answer) => {
                self.cache
                    .put(name, qtype, &answer, std::time::Instant::now());
                Ok(answer)
            }
            None => Err(last.unwrap_or_else(|| UpstreamFailure {
                upstream: None,
                reason: if self.servers.is_empty() {
                    "no upstream configured".to_owned()
                } else {
                    format!(
                        "no answer from the upstreams within {} ms",
                        self.total_timeout.as_millis()
                    )
                },
            })),
        }
    }

    /// One upstream's definitive answer (records, NXDOMAIN or NODATA), or why there is none;
    /// what it shows of the upstream's health is recorded.
    async fn attempt(
        &self,
        server: &Server,
        question: &OutgoingQuery,
        rto: Duration,
        deadline: Instant,
    ) -> Result<UpstreamAnswer, AttemptError> {
        let started = Instant::now();
        let fail = |reason: String| {
            server.health.failed(Instant::now());
            AttemptError { reason }
        };
        let mut message = if server.udp {
            match udp::ask(server.addr, self.mark, question, rto, deadline).await {
                UdpOutcome::Reply(message) => message,
                UdpOutcome::TimedOut(reason) | UdpOutcome::Failed(reason) => {
                    return Err(fail(reason));
                }
            }
        } else {
            server.stream.ask(question, deadline).await.map_err(fail)?
        };
        server.timings.observe(started.elapsed());
        let rcode = message.metadata.response_code;
        if upstream_wide_failure(rcode) {
            server.health.failed(Instant::now());
        } else {
            server.health.answered(started.elapsed());
        }
        if server.udp && message.metadata.truncation && rcode == ResponseCode::NoError {
            // The same question, once, over TCP: never a question dnsfence did not decide on.
            message = server
                .stream
                .ask(question, deadline)
                .await
                .map_err(|reason| AttemptError { reason })?;
        }
        definitive(server.addr, message).map_err(|reason| AttemptError { reason })
    }

    /// Copies the question to an upstream that is down, in the background, to learn whether
    /// it is back; its answer only updates the upstream's health.
    fn probe(&self, index: usize, question: &OutgoingQuery, deadline: Instant) {
        let Some(server) = self.servers.get(index) else {
            return;
        };
        let (addr, mark, health, question) = (
            server.addr,
            self.mark,
            server.health.clone(),
            question.clone(),
        );
        // Over the upstream's own transport: a tcp:// or tls:// upstream has no UDP to probe.
        let stream = (!server.udp).then(|| server.stream.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = match stream {
                None => match udp::ask(addr, mark, &question, health::MAX_RTO, deadline).await {
                    UdpOutcome::Reply(message) => Some(message),
                    UdpOutcome::TimedOut(_) | UdpOutcome::Failed(_) => None,
                },
                Some(stream) => stream.ask(&question, deadline).await.ok(),
            };
            match reply {
                Some(message) if !upstream_wide_failure(message.metadata.response_code) => {
                    tracing::info!(upstream = %addr, "upstream answers again");
                    health.answered(started.elapsed());
                }
                _ => health.failed(Instant::now()),
            }
        });
    }
}

/// Rcodes that say the upstream will not serve us at all (rather than failing one name).
fn upstream_wide_failure(rcode: ResponseCode) -> bool {
    matches!(
        rcode,
        ResponseCode::Refused | ResponseCode::NotImp | ResponseCode::FormErr
    )
}

/// The next attempt to end, with its server's index; pending while none has ended.
fn next_outcome<'a, 'b>(
    attempts: &'b mut [Attempt<'a>],
) -> impl Future<Output = (usize, Result<UpstreamAnswer, AttemptError>)> + 'b {
    std::future::poll_fn(move |cx| {
        for attempt in attempts.iter_mut() {
            let Some(future) = attempt.future.as_mut() else {
                continue;
            };
            if let Poll::Ready(result) = future.as_mut().poll(cx) {
                attempt.future = None;
                return Poll::Ready((attempt.server, result));
            }
        }
        Poll::Pending
    })
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
