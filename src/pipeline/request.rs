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

/// The one rule for a message's shape, shared by the full path ([`question_of`], on hickory's
/// parse) and the fast path (`super::fast`, on the raw header): a standard `QUERY`, exactly one
/// question, no answer or authority records, class `IN`.
pub fn check_shape(
    op_code: OpCode,
    questions: usize,
    answers: usize,
    authorities: usize,
    class: DNSClass,
) -> Result<(), Rejection> {
    if op_code != OpCode::Query {
        return Err(Rejection::OpCode);
    }
    if questions != 1 || answers != 0 || authorities != 0 {
        return Err(Rejection::Malformed);
    }
    if class != DNSClass::IN {
        return Err(Rejection::Class);
    }
    Ok(())
}

/// Extracts the single question of `message`, or says why there is none to answer.
pub fn question_of(message: &MessageRequest) -> Result<Question, Rejection> {
    let queries = message.queries.queries();
    let class = queries.first().map_or(DNSClass::IN, |q| q.query_class());
    check_shape(
        message.metadata.op_code,
        queries.len(),
        message.answers.len(),
        message.authorities.len(),
        class,
    )?;
    let [query] = queries else {
        return Err(Rejection::Malformed);
    };
    let mut name = query.original().name().clone();
    // A name on the wire is always absolute; make it so for the resolver, which would otherwise
    // append a search domain.
    name.set_fqdn(true);
    Ok(Question {
        name,
        qtype: query.query_type(),
    })
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::Request;

    use super::*;

    fn query(name: &str, qtype: RecordType) -> Query {
        let mut query = Query::query(Name::from_ascii(name).unwrap(), qtype);
        query.set_query_class(DNSClass::IN);
        query
    }

    /// The message as the server reads it off the wire.
    fn request(message: &Message) -> Request {
        let bytes = message.to_vec().unwrap();
        Request::from_bytes(bytes, "127.0.0.1:40000".parse().unwrap(), Protocol::Udp).unwrap()
    }

    #[test]
    fn only_one_standard_in_question_with_empty_sections_goes_further() {
        let a_record = Record::from_rdata(
            Name::from_ascii("x.example.").unwrap(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        );
        type Shape = fn(&mut Message);
        let cases: &[(&str, Shape, Result<RecordType, Rejection>)] = &[
            ("one A question", |_| {}, Ok(RecordType::A)),
            (
                "one AAAA question",
                |m| m.queries = vec![query("api.example.", RecordType::AAAA)],
                Ok(RecordType::AAAA),
            ),
            (
                "a meta type is the policy's business, not this stage's",
                |m| m.queries = vec![query("api.example.", RecordType::ANY)],
                Ok(RecordType::ANY),
            ),
            (
                "no question",
                |m| m.queries.clear(),
                Err(Rejection::Malformed),
            ),
            (
                "two questions",
                |m| m.queries.push(query("other.example.", RecordType::A)),
                Err(Rejection::Malformed),
            ),
            (
                "an opcode other than QUERY",
                |m| m.metadata.op_code = OpCode::Status,
                Err(Rejection::OpCode),
            ),
            (
                "NOTIFY",
                |m| m.metadata.op_code = OpCode::Notify,
                Err(Rejection::OpCode),
            ),
            (
                "class CH (version.bind)",
                |m| {
                    let mut q = query("version.bind.", RecordType::TXT);
                    q.set_query_class(DNSClass::CH);
                    m.queries = vec![q];
                },
                Err(Rejection::Class),
            ),
            (
                "class ANY",
                |m| {
                    m.queries[0].set_query_class(DNSClass::ANY);
                },
                Err(Rejection::Class),
            ),
        ];
        for (what, shape, expected) in cases {
            let mut message = Message::query();
            message.add_query(query("api.example.", RecordType::A));
            shape(&mut message);
            let got = question_of(&request(&message)).map(|q| q.qtype);
            assert_eq!(&got, expected, "{what}");
        }
        // Records smuggled into a query's answer or authority section.
        for section in ["answer", "authority"] {
            let mut message = Message::query();
            message.add_query(query("api.example.", RecordType::A));
            match section {
                "answer" => message.answers.push(a_record.clone()),
                _ => message.authorities.push(a_record.clone()),
            }
            let got = question_of(&request(&message)).map(|q| q.qtype);
            assert_eq!(got, Err(Rejection::Malformed), "a record in the {section}");
        }
    }

    #[test]
    fn the_name_keeps_its_case_and_is_absolute() {
        let mut message = Message::query();
        message.add_query(query("ApI.ExAmple.", RecordType::A));
        let question = question_of(&request(&message)).unwrap();
        assert_eq!(question.name.to_string(), "ApI.ExAmple.");
        assert!(question.name.is_fqdn());
    }

    #[test]
    fn each_rejection_has_its_rcode_and_reason() {
        let table = [
            (Rejection::OpCode, ResponseCode::NotImp, DenyReason::Opcode),
            (
                Rejection::Malformed,
                ResponseCode::FormErr,
                DenyReason::Malformed,
            ),
            (Rejection::Class, ResponseCode::Refused, DenyReason::Qtype),
        ];
        for (rejection, rcode, reason) in table {
            assert_eq!(rejection.rcode(), rcode, "{rejection:?}");
            assert_eq!(rejection.deny_reason(), reason, "{rejection:?}");
        }
    }
}
