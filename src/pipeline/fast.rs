//! The fast path: cache hits and local denials answered from the datagram's own bytes.
//!
//! ```text
//! bytes ─► parse_query ─► decide ─┬─ deny ─────────────────────────────► gate ─► header + question
//!          header and one         │                                            (+ OPT)
//!          question, in place     └─ allow ─► reply cache ─► admission ─► gate ─► header + question
//!          (anything unusual:                 encoded answer  acknowledged        + cached answer,
//!           the full path)                    + TTL offsets   moments ago?        TTLs patched (+ OPT)
//! ```
//!
//! Most queries an agent sends are the same few names again and again, or names it may not
//! have. [`Pipeline::answer_wire`](super::Pipeline::answer_wire) answers those without building
//! a hickory message: it reads the header and the one question where they lie in the datagram
//! ([`parse_query`]), decides as the full path does, and writes the reply into the caller's
//! buffer. A hit's answer comes from a cache of *encoded* answers ([`WireAnswer`]): the bytes
//! after the question, as the full path encoded them, with the offsets of their TTLs, which are
//! lowered by the answer's age on the way out; the ID, flags and the question (with the
//! client's letter case) come from the request. The cache is keyed by policy generation, client
//! group, name (lower case) and type, so a reload, a grant or another group never sees an answer
//! filtered for something else; it holds only answers that depend on nothing else (no grant, no
//! audit mode, nothing the log has to explain) and is filled by the full path.
//!
//! The fast path is faster, not looser. Its request checks are [`check_shape`]'s (the full
//! path's) plus stricter ones of its own: a query with a pointer in its name, header bits a
//! query does not set (AA, TC, Z, an rcode), EDNS with options, another version or flags other
//! than DO, a meta type (ANY, AXFR, ...), records beyond the OPT or bytes after it all go to
//! the full path, which answers them as it always has. The rate limit, the exfiltration budget
//! and the in-flight limits are the full path's own code (`Pipeline::gate`).
//! An answer leaves only if the firewall acknowledged every one of its addresses for this
//! client moments ago, for at least the lifetime the answer's TTL asks; otherwise the query goes
//! to the full path, which admits them (and answers SERVFAIL if the kernel refuses). A reply
//! that would not fit the client's buffer goes to the full path too (which truncates).

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::ProtoError;
use hickory_proto::op::Edns;
use hickory_proto::op::{EmitAndCount, Header, Metadata, OpCode, ResponseCode, emit_message_parts};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder, NameEncoding};

use super::request::check_shape;
use crate::querylog::LoggedAddress;

/// Longest encoded answer the reply cache keeps (anything longer needs TCP anyway, and bounds
/// the cache's memory: entries times this).
pub const MAX_CACHED_ANSWER: usize = 1232;

/// Header flag bits of a query.
const QR: u16 = 0x8000;
const OPCODE: u16 = 0x7800;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const Z: u16 = 0x0040;
const CD: u16 = 0x0010;
const RCODE: u16 = 0x000f;
/// The DO bit of the OPT record's flags.
const DNSSEC_OK: u32 = 0x8000;
const OPT: u16 = 41;

/// A query as it lies in the datagram: a plain `QUERY` for one `IN` question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireQuery<'m> {
    pub id: u16,
    flags: u16,
    /// The question as received: name, type, class.
    question: &'m [u8],
    /// Length of the name at the start of `question`.
    name_len: usize,
    pub qtype: RecordType,
    /// The payload size of the client's OPT record, if it sent one.
    pub edns_payload: Option<u16>,
}

impl<'m> WireQuery<'m> {
    /// The name as received (wire form, the client's case).
    pub fn wire_name(&self) -> &'m [u8] {
        self.question.get(..self.name_len).unwrap_or_default()
    }

    /// Length of the question section as received.
    pub fn question_len(&self) -> usize {
        self.question.len()
    }

    /// The name, parsed as the full path parses it; `None` sends the query there.
    pub fn name(&self) -> Option<Name> {
        let mut name = Name::read(&mut BinDecoder::new(self.wire_name())).ok()?;
        name.set_fqdn(true);
        Some(name)
    }

    /// The payload size dnsfence's OPT record announces, and the largest reply over UDP: the
    /// smaller of the client's and `cap`, never below 512; 512 without EDNS.
    pub fn udp_limit(&self, cap: u16) -> u16 {
        self.edns_payload
            .map_or(512, |p| p.clamp(512, cap.max(512)))
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*pair.first()?, *pair.get(1)?]))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16_at(bytes, at)?) << 16 | u32::from(u16_at(bytes, at + 2)?))
}

/// Types whose answers cannot be filtered (the policy refuses them in `qtypes`).
pub fn is_meta_qtype(qtype: RecordType) -> bool {
    matches!(
        qtype,
        RecordType::ANY | RecordType::AXFR | RecordType::IXFR | RecordType::OPT | RecordType::TSIG
    )
}

/// Reads the header and the one question of `message` in place; `None` for anything the
/// fast path leaves to the full one (see the module docs).
pub fn parse_query(message: &[u8]) -> Option<WireQuery<'_>> {
    let id = u16_at(message, 0)?;
    let flags = u16_at(message, 2)?;
    let (qdcount, ancount, nscount, arcount) = (
        u16_at(message, 4)?,
        u16_at(message, 6)?,
        u16_at(message, 8)?,
        u16_at(message, 10)?,
    );
    if flags & (QR | AA | TC | Z | RCODE) != 0 || arcount > 1 {
        return None;
    }
    // The name: plain labels only (no pointer, no extended label type), at most 255 octets.
    let mut at = 12;
    loop {
        let len = usize::from(*message.get(at)?);
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
        if at - 12 > 255 {
            return None;
        }
        if len == 0 {
            break;
        }
    }
    let name_len = at - 12;
    let qtype = RecordType::from(u16_at(message, at)?);
    let class = DNSClass::from(u16_at(message, at + 2)?);
    let op_code = OpCode::from_u8(u8::try_from((flags & OPCODE) >> 11).ok()?);
    check_shape(
        op_code,
        usize::from(qdcount),
        usize::from(ancount),
        usize::from(nscount),
        class,
    )
    .ok()?;
    if is_meta_qtype(qtype) || u16::from(qtype) == 0 {
        return None;
    }
    let question = message.get(12..at + 4)?;
    at += 4;
    let edns_payload = if arcount == 1 {
        // Exactly a bare OPT: root name, version 0, no extended rcode, no flags but DO, no
        // options.
        let opt = message.get(at..)?;
        if opt.len() != 11
            || opt.first() != Some(&0)
            || u16_at(opt, 1)? != OPT
            || u32_at(opt, 5)? & !DNSSEC_OK != 0
            || u16_at(opt, 9)? != 0
        {
            return None;
        }
        Some(u16_at(opt, 3)?)
    } else {
        if message.len() != at {
            return None;
        }
        None
    };
    Some(WireQuery {
        id,
        flags,
        question,
        name_len,
        qtype,
        edns_payload,
    })
}

/// Appends the reply's header and question (the request's, as received) to `out`.
pub fn write_head(out: &mut Vec<u8>, query: &WireQuery<'_>, rcode: ResponseCode, counts: [u16; 3]) {
    let [answers, authorities, additionals] = counts;
    let flags = QR | RA | (query.flags & (RD | CD)) | (u16::from(rcode.low()) & RCODE);
    for word in [query.id, flags, 1, answers, authorities, additionals] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(query.question);
}

/// Appends dnsfence's OPT record (no options, no flags) announcing `payload`.
pub fn write_opt(out: &mut Vec<u8>, payload: u16) {
    out.push(0);
    out.extend_from_slice(&OPT.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
}

/// Writes a reply without records (a denial, a refusal) into `out`.
pub fn write_empty(out: &mut Vec<u8>, query: &WireQuery<'_>, rcode: ResponseCode, cap: u16) {
    out.clear();
    let additionals = u16::from(query.edns_payload.is_some());
    write_head(out, query, rcode, [0, 0, additionals]);
    if query.edns_payload.is_some() {
        write_opt(out, query.udp_limit(cap));
    }
}

/// An answer as it goes on the wire after the question, with what the fast path needs to send
/// it again: where its TTLs are, what the firewall must hold, what the log says.
#[derive(Debug, Clone)]
pub struct WireAnswer {
    pub rcode: ResponseCode,
    pub answers: u16,
    pub authorities: u16,
    /// The answer and authority sections, encoded after the question in lower case (so its
    /// compression pointers hold for any question of the same name and type).
    pub body: Box<[u8]>,
    /// Offsets in `body` of every TTL, with the TTL stored there.
    pub ttls: Box<[(u16, u32)]>,
    /// The longest TTL among the address-carrying records (A, AAAA, HTTPS, SVCB): what the
    /// firewall's elements must outlive.
    pub address_ttl: u32,
    pub addresses: Box<[IpAddr]>,
    pub logged: Box<[LoggedAddress]>,
    pub refused: Box<[IpAddr]>,
    pub upstream: Option<std::net::SocketAddr>,
}

/// An encoded answer: body, answer and authority counts, TTL offsets, address TTL.
pub type Encoded = (Box<[u8]>, u16, u16, Vec<(u16, u32)>, u32);

/// What a cached answer is filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyKey {
    pub generation: u64,
    pub group: Box<str>,
    pub qtype: u16,
    /// The name's wire form in lower case.
    pub name: Box<[u8]>,
}

/// The borrowed form of a [`ReplyKey`], hashed the same way.
#[derive(Hash)]
pub struct ReplyProbe<'a> {
    pub generation: u64,
    pub group: &'a str,
    pub qtype: u16,
    pub name: &'a [u8],
}

impl ReplyProbe<'_> {
    pub fn matches(&self, key: &ReplyKey) -> bool {
        key.generation == self.generation
            && key.qtype == self.qtype
            && *key.group == *self.group
            && *key.name == *self.name
    }

    pub fn to_key(&self) -> ReplyKey {
        ReplyKey {
            generation: self.generation,
            group: self.group.into(),
            qtype: self.qtype,
            name: self.name.into(),
        }
    }
}

impl ReplyKey {
    pub fn probe(&self) -> ReplyProbe<'_> {
        ReplyProbe {
            generation: self.generation,
            group: &self.group,
            qtype: self.qtype,
            name: &self.name,
        }
    }
}

/// `name`'s wire form in lower case (ASCII only; length octets are below `A`, so they pass).
pub fn lower_wire(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 1);
    for label in name.iter() {
        let Ok(len) = u8::try_from(label.len()) else {
            continue;
        };
        out.push(len);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

impl WireAnswer {
    /// Encodes `answers` and `soa` as the full path does, for the question `lower_name`/`qtype`
    /// (lower case), and finds their TTLs. `None` when it does not encode or is too long to
    /// keep.
    pub fn encode(
        lower_name: &[u8],
        qtype: RecordType,
        rcode: ResponseCode,
        answers: &[Record],
        soa: Option<&Record>,
    ) -> Option<Encoded> {
        let mut question = Vec::with_capacity(lower_name.len() + 4);
        question.extend_from_slice(lower_name);
        question.extend_from_slice(&u16::from(qtype).to_be_bytes());
        question.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
        let mut metadata =
            Metadata::new(0, hickory_proto::op::MessageType::Response, OpCode::Query);
        metadata.response_code = rcode;
        let mut out = Vec::with_capacity(512);
        let questions = Questions {
            bytes: &question,
            count: 1,
        };
        encode(&mut out, &metadata, questions, answers, soa, None, u16::MAX).ok()?;
        let an = u16_at(&out, 6)?;
        let ns = u16_at(&out, 8)?;
        let start = 12 + question.len();
        let body = out.get(start..)?;
        if body.len() > MAX_CACHED_ANSWER {
            return None;
        }
        let (ttls, address_ttl) = find_ttls(body, usize::from(an) + usize::from(ns))?;
        Some((body.into(), an, ns, ttls, address_ttl))
    }

    /// The whole reply's length with `question_len` bytes of question and an OPT or not.
    pub fn reply_len(&self, question_len: usize, edns: bool) -> usize {
        12 + question_len + self.body.len() + if edns { 11 } else { 0 }
    }

    /// Writes the reply to `query` into `out`, every TTL lowered by `age` seconds; returns the
    /// longest TTL sent on an address-carrying record.
    pub fn write(&self, out: &mut Vec<u8>, query: &WireQuery<'_>, age: u32, cap: u16) -> u32 {
        out.clear();
        let edns = query.edns_payload.is_some();
        write_head(
            out,
            query,
            self.rcode,
            [self.answers, self.authorities, u16::from(edns)],
        );
        let start = out.len();
        out.extend_from_slice(&self.body);
        for &(offset, ttl) in &self.ttls {
            let at = start + usize::from(offset);
            if let Some(field) = out.get_mut(at..at + 4) {
                field.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
            }
        }
        if edns {
            write_opt(out, query.udp_limit(cap));
        }
        self.address_ttl.saturating_sub(age)
    }
}

/// Walks `count` records of `body` and returns the
/// offset and value of each TTL, and the longest TTL of an address-carrying record.
fn find_ttls(body: &[u8], count: usize) -> Option<(Vec<(u16, u32)>, u32)> {
    let mut ttls = Vec::with_capacity(count);
    let mut address_ttl = 0;
    let mut at = 0;
    for _ in 0..count {
        // The owner name: labels up to a root or a pointer.
        loop {
            let len = *body.get(at)?;
            if len & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        let rtype = RecordType::from(u16_at(body, at)?);
        let ttl = u32_at(body, at + 4)?;
        ttls.push((u16::try_from(at + 4).ok()?, ttl));
        if matches!(
            rtype,
            RecordType::A | RecordType::AAAA | RecordType::HTTPS | RecordType::SVCB
        ) {
            address_ttl = address_ttl.max(ttl);
        }
        at += 10 + usize::from(u16_at(body, at + 8)?);
    }
    (at == body.len()).then_some((ttls, address_ttl))
}

/// The question section of a reply: the request's, byte for byte as the client sent it.
#[derive(Clone, Copy)]
pub struct Questions<'q> {
    pub bytes: &'q [u8],
    pub count: usize,
}

impl Questions<'_> {
    pub const NONE: Questions<'static> = Questions {
        bytes: &[],
        count: 0,
    };
}

impl EmitAndCount for Questions<'_> {
    fn emit(&mut self, encoder: &mut BinEncoder<'_>) -> Result<usize, ProtoError> {
        let start = encoder.offset();
        encoder.emit_vec(self.bytes)?;
        let end = start + self.bytes.len();
        // Names of the answer point back into the question (as hickory's own responses do).
        if self.count > 0
            && matches!(encoder.name_encoding(), NameEncoding::Compressed)
            && end <= usize::from(u16::MAX)
        {
            encoder.store_label_pointer(start, end);
        }
        Ok(self.count)
    }
}

/// Encodes a reply into `out` in at most `max_size` bytes: records that do not fit are left out
/// and the header says TC. The full path's one encoder; the reply cache's answers come from it
/// too.
pub fn encode(
    out: &mut Vec<u8>,
    metadata: &Metadata,
    mut questions: Questions<'_>,
    answers: &[Record],
    soa: Option<&Record>,
    edns: Option<&Edns>,
    max_size: u16,
) -> Result<Header, ProtoError> {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(max_size);
    emit_message_parts(
        metadata,
        &mut questions,
        &mut answers.iter(),
        &mut soa.into_iter(),
        &mut std::iter::empty::<&Record>(),
        edns,
        None,
        &mut encoder,
    )
}

/// Seconds of `age`, for TTLs.
pub fn age_secs(age: Duration) -> u32 {
    u32::try_from(age.as_secs()).unwrap_or(u32::MAX)
}
