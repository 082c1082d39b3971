//! One DNS message in, one reply out: the seam between the front ends and the [`Pipeline`].
//!
//! [`Handler::answer`] takes the bytes of a message and writes the bytes of its reply; the
//! front ends (`udp.rs`, `tcp.rs`) only move bytes and call [`Handler::finish`] once the reply
//! is on its way, which writes the log record with the real latency and whether the reply
//! left. A message that is not a DNS query gets FORMERR (or silence, when not even its header
//! can be read, or when it is a response: answering responses would make dnsfence a
//! reflector) and is logged as `malformed` either way.
//!
//! [`Handler::answer_fast`] comes first: the pipeline's fast path answers denials and cache
//! hits from the message's bytes (`pipeline/fast.rs`), and says `None` for everything else.
//! Otherwise requests are parsed with hickory-server's request type; replies are encoded with
//! the one encoder the reply cache's answers also come from (`pipeline::fast::encode`): the question section as the client sent it, dnsfence's own
//! EDNS (so a UDP reply never exceeds [`MAX_UDP_PAYLOAD`] bytes and is truncated with TC
//! instead of fragmented), the answer records and, for negative answers, the SOA.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::Edns;
use hickory_proto::op::{Header, MessageType, Metadata, ResponseCode};
use hickory_proto::serialize::binary::BinDecodable;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;

use super::MAX_UDP_PAYLOAD;
use crate::pipeline::decision::DenyReason;
use crate::pipeline::fast::{Questions, encode};
use crate::pipeline::request::question_of;
use crate::pipeline::{Pipeline, Transport};
use crate::querylog::{QueryLog, QueryRecord};
use crate::stage_times::{self, Stage};

/// Answers messages through the pipeline and logs them.
pub struct Handler {
    pipeline: Arc<Pipeline>,
    log: QueryLog,
}

/// The log record of a reply that is about to be sent; [`Handler::finish`] completes it.
#[must_use = "a query's log record is written by Handler::finish"]
pub struct Pending {
    record: QueryRecord,
    started: Instant,
    /// Which stage its time counts as in `stage_times`.
    stage: Stage,
}

impl Handler {
    pub fn new(pipeline: Arc<Pipeline>, log: QueryLog) -> Handler {
        Handler { pipeline, log }
    }

    /// The client `peer` counts as for per-client limits ([`Pipeline::client_identity`]).
    pub fn client_identity(&self, peer: IpAddr) -> IpAddr {
        self.pipeline.client_identity(peer)
    }

    /// Answers `message` from `peer` on the fast path (a denial, or a cache hit whose
    /// addresses the firewall holds): no hickory message, no task, nothing awaited. `None`
    /// (with `reply` untouched) when it needs [`Handler::answer`].
    pub fn answer_fast(
        &self,
        message: &[u8],
        peer: SocketAddr,
        transport: Transport,
        reply: &mut Vec<u8>,
    ) -> Option<Pending> {
        let started = Instant::now();
        let record = self
            .pipeline
            .answer_wire(message, peer, transport, MAX_UDP_PAYLOAD, reply)?;
        Some(Pending {
            record,
            started,
            stage: Stage::QueryFast,
        })
    }

    /// Answers `message` from `peer`: writes the reply into `reply` (left empty when the
    /// message gets no reply). Over UDP the reply fits the client's EDNS buffer (at most
    /// [`MAX_UDP_PAYLOAD`], 512 without EDNS) and is truncated with TC beyond it.
    pub async fn answer(
        &self,
        message: Vec<u8>,
        peer: SocketAddr,
        transport: Transport,
        reply: &mut Vec<u8>,
    ) -> Pending {
        let started = Instant::now();
        reply.clear();
        let Ok(header) = Header::from_bytes(&message) else {
            return self.malformed(peer, transport, started, false);
        };
        if header.metadata.message_type == MessageType::Response {
            return self.malformed(peer, transport, started, false);
        }
        let protocol = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        let Ok(request) = Request::from_bytes(message, peer, protocol) else {
            // No question could be read back: the FORMERR carries the header alone.
            let mut metadata = Metadata::response_from_request(&header.metadata);
            metadata.response_code = ResponseCode::FormErr;
            let encoded = encode(reply, &metadata, Questions::NONE, &[], None, None, 512);
            return self.malformed(peer, transport, started, encoded.is_ok());
        };

        let (answer, mut record) = match question_of(&request) {
            Ok(question) => self.pipeline.answer(peer, transport, &question).await,
            Err(rejection) => self.pipeline.rejected(
                peer,
                transport,
                None,
                rejection.rcode(),
                rejection.deny_reason(),
            ),
        };
        if let Some(question) = request.queries.queries().first()
            && record.qname.is_absent()
        {
            record = record.with_question(question.original().name(), question.query_type());
        }

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        metadata.response_code = answer.rcode;
        let edns = request.edns.as_ref().map(|client_edns| {
            let mut edns = Edns::new();
            edns.set_max_payload(client_edns.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            edns
        });
        let max_size = match transport {
            // dnsfence's EDNS payload size is already the smaller of the client's and ours;
            // without EDNS, RFC 1035's 512 bytes.
            Transport::Udp => edns
                .as_ref()
                .map_or(512, |edns| edns.max_payload().max(512)),
            Transport::Tcp => u16::MAX,
        };
        let questions = Questions {
            bytes: request.queries.as_bytes(),
            count: request.queries.len(),
        };
        match encode(
            reply,
            &metadata,
            questions,
            &answer.answers,
            answer.soa.as_ref(),
            edns.as_ref(),
            max_size,
        ) {
            Ok(sent) => record.truncated = sent.metadata.truncation,
            Err(error) => {
                tracing::debug!(%error, client = %peer, "cannot encode the reply");
                reply.clear();
                record.error = Some(format!("reply not sent: {error}"));
            }
        }
        Pending {
            record,
            started,
            stage: Stage::QueryMiss,
        }
    }

    /// Writes the log record of a reply once it was sent (or failed to be: `sent` says why).
    pub fn finish(&self, pending: Pending, sent: Result<(), String>) {
        let Pending {
            mut record,
            started,
            stage,
        } = pending;
        if let Err(error) = sent {
            tracing::debug!(%error, client = %record.client, "cannot send the reply");
            record.error = Some(format!("reply not sent: {error}"));
            record.truncated = false;
        }
        let took = started.elapsed();
        stage_times::record(stage, took);
        record.latency_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.log.record(record);
    }

    fn malformed(
        &self,
        peer: SocketAddr,
        transport: Transport,
        started: Instant,
        answered: bool,
    ) -> Pending {
        let (_, mut record) = self.pipeline.rejected(
            peer,
            transport,
            None,
            ResponseCode::FormErr,
            DenyReason::Malformed,
        );
        if !answered {
            record.error = Some("not answered".to_owned());
        }
        Pending {
            record,
            started,
            stage: Stage::QueryMiss,
        }
    }
}

#[cfg(test)]
#[path = "fast_path_tests.rs"]
pub(super) mod fast_path_tests;
