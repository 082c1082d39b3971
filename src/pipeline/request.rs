//! Stage 1: is this message a question dnsfence answers at all?
//!
//! Only a standard `QUERY` with exactly one question of class `IN`, and nothing in its answer or
//! authority sections, goes further. Everything else is answered here, locally, with the rcode
//! RFC 1035 and RFC 6891 prescribe, and is never forwarded: a second question, an odd opcode or
//! records smuggled into a query are all ways to carry bytes past a filter that looks at the
//! first question only.

use hickory_proto::op::{OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_server::zone_handler::MessageRequest;

use super::decision::DenyReason;

/// The one question of an acceptable query.
#[derive(Debug, Clone)]
pub struct Question {
    /// The name exactly as received (wire labels, original case).
    pub name: Name,
    pub qtype: RecordType,
}

/// Why a message is answered without looking at the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a standard query (NOTIMP).
    OpCode,
    /// Zero or several questions, or records where a query has none (FORMERR).
    Malformed,
    /// A class other than IN (REFUSED): CHAOS `version.bind` and friends stay local.
    Class,
}

impl Rejection {
    /// The reason the query log and the metrics give for it.
    pub fn deny_reason(self) -> DenyReason {
        match self {
            Rejection::OpCode => DenyReason::Opcode,
            Rejection::Malformed => DenyReason::Malformed,
            Rejection::Class => DenyReason::Qtype,
        }
    }

    pub fn rcode(self) -> ResponseCode {
        match self {
            Rejection::OpCode => ResponseCode::NotImp,
            Rejection::Malformed => ResponseCode::FormErr,
            Rejection::Class => ResponseCode::Refused,
        }
    }
}

/// Extracts the single question of `message`, or says why there is none to answer.
pub fn question_of(message: &MessageRequest) -> Result<Question, Rejection> {
    if message.metadata.op_code != OpCode::Query {
        return Err(Rejection::OpCode);
    }
    let queries = message.queries.queries();
    let [query] = queries else {
        return Err(Rejection::Malformed);
    };
    if !message.answers.is_empty() || !message.authorities.is_empty() {
        return Err(Rejection::Malformed);
    }
    if query.query_class() != DNSClass::IN {
        return Err(Rejection::Class);
    }
    let mut name = query.original().name().clone();
    // A name on the wire is always absolute; make it so for the resolver, which would otherwise
    // append a search domain.
    name.set_fqdn(true);
    Ok(Question {
        name,
        qtype: query.query_type(),
    })
}
