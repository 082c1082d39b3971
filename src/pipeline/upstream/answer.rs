//! What the upstream stage hands the rest of the pipeline: an answer, or why there is none.

use std::net::SocketAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::Record;

/// A definitive answer from an upstream: records, or a negative answer with its SOA.
#[derive(Debug, Clone)]
pub struct UpstreamAnswer {
    pub upstream: SocketAddr,
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    /// The SOA of a negative answer (NXDOMAIN or NODATA), for negative caching by the client.
    pub soa: Option<Record>,
}

/// Why no upstream gave a definitive answer.
#[derive(Debug, Clone)]
pub struct UpstreamFailure {
    /// The last upstream tried, if any.
    pub upstream: Option<SocketAddr>,
    pub reason: String,
}
