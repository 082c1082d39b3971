//! The query dnsfence sends upstream, byte for byte, and the test a reply must pass to be its
//! answer.
//!
//! The query is written by hand rather than through hickory's encoder: it is always the same
//! shape (header, one question, an OPT record), and owning the bytes lets every attempt stamp
//! its own random ID and letter case into them without re-encoding.
//!
//! A reply is the answer to a query only if it carries the query's ID, is a response to a
//! standard query, has exactly one question, and that question is the query's own *byte for
//! byte*: the same name in the same letter case, the same type and class. The letter case is
//! random per query ("0x20", as Unbound's `use-caps-for-id`), so a forger who does not see
//! the query must guess one bit per letter on top of the ID and the source port. Everything
//! that fails the test is ignored, never taken as a failure: a forger who cannot guess the
//! answer must not be able to cut the real one off either.

use hickory_proto::rr::{Name, RecordType};

/// EDNS buffer advertised upstream: larger answers come back truncated and go to TCP.
pub const EDNS_PAYLOAD: u16 = 1232;

const HEADER_LEN: usize = 12;
/// Flags of the query: a standard query with recursion desired.
const FLAGS_RD: [u8; 2] = [0x01, 0x00];
const CLASS_IN: u16 = 1;
const TYPE_OPT: u16 = 41;

/// One question as sent upstream, with room for a fresh ID and letter case per attempt.
#[derive(Clone)]
pub struct OutgoingQuery {
    bytes: Vec<u8>,
    /// End of the name (after its root label).
    name_end: usize,
    /// End of the question section (name, type, class).
    question_end: usize,
}

/// Why a datagram is not the answer to the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    TooShort,
    OtherId,
    NotAResponse,
    OtherOpcode,
    OtherQuestionCount,
    /// The question is ours except for the letter case: a forger's guess, or an upstream
    /// that does not echo the question as asked.
    OtherCase,
    OtherQuestion,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::TooShort => "shorter than a header and the question",
            Rejected::OtherId => "another ID",
            Rejected::NotAResponse => "not a response",
            Rejected::OtherOpcode => "another opcode",
            Rejected::OtherQuestionCount => "not exactly one question",
            Rejected::OtherCase => "the question in another letter case",
            Rejected::OtherQuestion => "another question",
        }
    }
}

impl OutgoingQuery {
    /// The query for `name`/`qtype` (ID 0, the name as given) with an OPT record.
    pub fn new(name: &Name, qtype: RecordType) -> OutgoingQuery {
        let mut bytes = Vec::with_capacity(HEADER_LEN + 256 + 4 + 11);
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&FLAGS_RD);
        // One question, no answer or authority records, one additional (the OPT record).
        bytes.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
        // `Name` keeps its wire form within 255 octets and its labels within 63.
        for label in name.iter() {
            #[allow(clippy::cast_possible_truncation)]
            bytes.push(label.len() as u8);
            bytes.extend_from_slice(label);
        }
        bytes.push(0);
        let name_end = bytes.len();
        bytes.extend_from_slice(&u16::from(qtype).to_be_bytes());
        bytes.extend_from_slice(&CLASS_IN.to_be_bytes());
        let question_end = bytes.len();
        // OPT: root owner, type 41, class = UDP payload size, TTL 0 (no DO bit), no options.
        bytes.push(0);
        bytes.extend_from_slice(&TYPE_OPT.to_be_bytes());
        bytes.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        OutgoingQuery {
            bytes,
            name_end,
            question_end,
        }
    }

    /// Draws a fresh random ID and, if `mix_case`, a fresh random letter case for the name.
    pub fn randomize(&mut self, mix_case: bool) {
        let id: u16 = rand::random();
        if let Some(slot) = self.bytes.get_mut(..2) {
            slot.copy_from_slice(&id.to_be_bytes());
        }
        if !mix_case {
            return;
        }
        let mut bits: u64 = 0;
        let mut left = 0u32;
        // Length octets are at most 63, never an ASCII letter, so every letter in the name
        // region is a letter of a label.
        for byte in self
            .bytes
            .get_mut(HEADER_LEN..self.name_end)
            .unwrap_or_default()
        {
            if !byte.is_ascii_alphabetic() {
                continue;
            }
            if left == 0 {
                bits = rand::random();
                left = 64;
            }
            *byte = if bits & 1 == 1 {
                byte.to_ascii_uppercase()
            } else {
                byte.to_ascii_lowercase()
            };
            bits >>= 1;
            left -= 1;
        }
    }

    pub fn id(&self) -> u16 {
        match self.bytes.get(..2) {
            Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
            _ => 0,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether `reply` is the answer to this query (see the module docs); cheap, before any
    /// parsing.
    pub fn check(&self, reply: &[u8]) -> Result<(), Rejected> {
        let (Some(header), Some(question), Some(sent)) = (
            reply.get(..HEADER_LEN),
            reply.get(HEADER_LEN..self.question_end),
            self.bytes.get(HEADER_LEN..self.question_end),
        ) else {
            return Err(Rejected::TooShort);
        };
        if header.get(..2) != self.bytes.get(..2) {
            return Err(Rejected::OtherId);
        }
        let flags = header.get(2).copied().unwrap_or(0);
        if flags & 0x80 == 0 {
            return Err(Rejected::NotAResponse);
        }
        if (flags >> 3) & 0x0f != 0 {
            return Err(Rejected::OtherOpcode);
        }
        if header.get(4..6) != Some(&[0, 1]) {
            return Err(Rejected::OtherQuestionCount);
        }
        if question == sent {
            Ok(())
        } else if question.eq_ignore_ascii_case(sent) {
            Err(Rejected::OtherCase)
        } else {
            Err(Rejected::OtherQuestion)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode};

    fn query(name: &str) -> OutgoingQuery {
        OutgoingQuery::new(&Name::from_ascii(name).unwrap(), RecordType::AAAA)
    }

    #[test]
    fn the_query_is_a_well_formed_message_with_edns() {
        let mut q = query("api.allowed.test.");
        q.randomize(false);
        let message = Message::from_vec(q.bytes()).unwrap();
        assert_eq!(message.metadata.id, q.id());
        assert!(message.metadata.recursion_desired);
        assert_eq!(message.metadata.message_type, MessageType::Query);
        assert_eq!(message.queries.len(), 1);
        assert_eq!(message.queries[0].name().to_ascii(), "api.allowed.test.");
        assert_eq!(message.queries[0].query_type(), RecordType::AAAA);
        assert_eq!(message.edns.as_ref().unwrap().max_payload(), EDNS_PAYLOAD);
    }

    #[test]
    fn mixed_case_changes_only_letters_and_varies() {
        let mut spellings = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut q = query("a-1.allowed.test.");
            q.randomize(true);
            let message = Message::from_vec(q.bytes()).unwrap();
            let text = message.queries[0].name().to_ascii();
            assert!(text.eq_ignore_ascii_case("a-1.allowed.test."), "{text}");
            spellings.insert(text);
        }
        assert!(spellings.len() > 32, "{spellings:?}");
    }

    #[test]
    fn only_the_exact_question_with_the_id_is_an_answer() {
        let mut q = query("api.allowed.test.");
        q.randomize(true);
        let mut reply = Message::from_vec(q.bytes()).unwrap();
        reply.metadata.message_type = MessageType::Response;
        let good = reply.to_vec().unwrap();
        assert_eq!(q.check(&good), Ok(()));
        assert_eq!(q.check(&good[..20]), Err(Rejected::TooShort));

        let mut other_id = reply.clone();
        other_id.metadata.id = q.id().wrapping_add(1);
        assert_eq!(q.check(&other_id.to_vec().unwrap()), Err(Rejected::OtherId));

        let mut not_response = reply.clone();
        not_response.metadata.message_type = MessageType::Query;
        assert_eq!(
            q.check(&not_response.to_vec().unwrap()),
            Err(Rejected::NotAResponse)
        );

        let mut opcode = reply.clone();
        opcode.metadata.op_code = OpCode::Status;
        assert_eq!(
            q.check(&opcode.to_vec().unwrap()),
            Err(Rejected::OtherOpcode)
        );

        let mut case = good.clone();
        let letter = case[13..q.name_end]
            .iter()
            .position(u8::is_ascii_alphabetic)
            .unwrap()
            + 13;
        case[letter] ^= 0x20;
        assert_eq!(q.check(&case), Err(Rejected::OtherCase));

        let mut qtype = good.clone();
        qtype[q.name_end + 1] = 1;
        assert_eq!(q.check(&qtype), Err(Rejected::OtherQuestion));
    }
}
