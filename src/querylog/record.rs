//! The fields of one query line, as the answering thread hands them over.
//!
//! A record is plain owned data of fixed size: the name in wire form in a fixed buffer, the
//! type as a number, group and rule in short inline strings, the first addresses inline. Filling
//! one formats nothing and, in the common case, allocates nothing; turning it into text is the
//! writer thread's job ([`super::json`]).

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::time::SystemTime;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::domain::Label;
use hickory_proto::rr::{Name, RecordType};

use super::PolicyTag;

/// One line of the query log.
#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub time: SystemTime,
    /// The policy that decided this query ([`PolicyTag`]).
    pub policy: PolicyTag,
    pub client: IpAddr,
    pub port: u16,
    pub transport: &'static str,
    /// The name as received; written in presentation form with every unusual byte escaped.
    /// Absent (written `""`) when no question could be read.
    pub qname: QueryName,
    /// Written `""` when no question could be read.
    pub qtype: Option<RecordType>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The client group whose allowlist applied.
    pub group: Option<ShortText>,
    /// The rule that allowed the name.
    pub rule: Option<ShortText>,
    /// The temporary grant that allowed the name (written `g<id>`), when a grant did.
    pub grant: Option<u64>,
    /// Why the query was denied.
    pub reason: Option<&'static str>,
    /// The response code sent, as dig prints it: NOERROR, NXDOMAIN, SERVFAIL, REFUSED, ...
    pub rcode: ResponseCode,
    pub answers: LoggedAddresses,
    /// Answer addresses the address guard took out.
    pub refused: Vec<IpAddr>,
    pub upstream: Option<SocketAddr>,
    /// Why an allowed query failed (upstream down, firewall admission refused).
    pub error: Option<String>,
    pub truncated: bool,
    /// A denial that audit mode let through: forwarded and admitted anyway.
    pub audit: bool,
    pub latency_us: u64,
}

impl QueryRecord {
    /// A record of a query from `client`, stamped now, with no question yet and every outcome
    /// field at its default (a denial with NOERROR: the caller fills in what happened).
    pub fn new(client: SocketAddr, transport: &'static str) -> QueryRecord {
        QueryRecord {
            time: SystemTime::now(),
            policy: PolicyTag::default(),
            client: client.ip(),
            port: client.port(),
            transport,
            qname: QueryName::ABSENT,
            qtype: None,
            decision: "deny",
            group: None,
            rule: None,
            grant: None,
            reason: None,
            rcode: ResponseCode::NoError,
            answers: LoggedAddresses::default(),
            refused: Vec::new(),
            upstream: None,
            error: None,
            truncated: false,
            audit: false,
            latency_us: 0,
        }
    }

    /// Appends the record's JSON line (without the newline) to `out`: what the writer thread
    /// does with it.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        super::json::write_query(out, self);
    }

    /// Sets the question the record is about.
    pub fn with_question(mut self, name: &Name, qtype: RecordType) -> QueryRecord {
        self.qname = QueryName::of(name);
        self.qtype = Some(qtype);
        self
    }
}

/// Longest wire form of a name (RFC 1035 2.3.4), the root's zero octet included.
const MAX_WIRE: usize = 255;

/// A query name in wire form (length-prefixed labels, no root octet) in a fixed buffer: copying
/// one in costs a `memcpy` of its labels, and the escaping is done when it is written.
#[derive(Clone)]
pub struct QueryName {
    wire: [u8; MAX_WIRE],
    len: u8,
    state: NameState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NameState {
    /// No question: written as `""`.
    Absent,
    /// A name without the trailing root (written without the final dot).
    Relative,
    /// A fully qualified name (written with the final dot; the root is `.`).
    Fqdn,
}

impl QueryName {
    /// No name at all.
    pub const ABSENT: QueryName = QueryName {
        wire: [0; MAX_WIRE],
        len: 0,
        state: NameState::Absent,
    };

    /// Copies `name`'s labels. A name is at most 255 octets in wire form, so it always fits;
    /// should a longer one ever be built, the labels that do not fit are left out.
    pub fn of(name: &Name) -> QueryName {
        let mut out = QueryName {
            wire: [0; MAX_WIRE],
            len: 0,
            state: if name.is_fqdn() {
                NameState::Fqdn
            } else {
                NameState::Relative
            },
        };
        for label in name.iter() {
            if !out.push_label(label) {
                break;
            }
        }
        out
    }

    /// From a name in uncompressed wire form (`\x03api\x07example\x00`), as a wire-level parser
    /// sees it in the question. `None` if it is not one whole, valid, uncompressed name.
    pub fn from_wire(wire: &[u8]) -> Option<QueryName> {
        let mut out = QueryName {
            wire: [0; MAX_WIRE],
            len: 0,
            state: NameState::Fqdn,
        };
        let mut rest = wire;
        loop {
            let (&len, tail) = rest.split_first()?;
            if len == 0 {
                return tail.is_empty().then_some(out);
            }
            let len = usize::from(len);
            if len > 63 {
                return None;
            }
            let label = tail.get(..len)?;
            if !out.push_label(label) {
                return None;
            }
            rest = tail.get(len..)?;
        }
    }

    fn push_label(&mut self, label: &[u8]) -> bool {
        let start = usize::from(self.len);
        let Ok(len) = u8::try_from(label.len()) else {
            return false;
        };
        // The root octet needs its place too.
        let end = start + 1 + label.len();
        if label.is_empty() || end >= MAX_WIRE {
            return false;
        }
        let Some(slot) = self.wire.get_mut(start..end) else {
            return false;
        };
        if let Some((first, rest)) = slot.split_first_mut() {
            *first = len;
            rest.copy_from_slice(label);
        }
        self.len = end as u8;
        true
    }

    pub fn is_absent(&self) -> bool {
        self.state == NameState::Absent
    }

    /// The labels, first to last.
    pub fn labels(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.wire.get(..usize::from(self.len)).unwrap_or_default();
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let label = tail.get(..usize::from(len))?;
            rest = tail.get(usize::from(len)..).unwrap_or_default();
            Some(label)
        })
    }
}

impl QueryName {
    /// Appends the name as a JSON string when its presentation form needs no escaping (letters,
    /// digits, `_`, `-` inside a label, `*` at its start, no IDNA label): the common case,
    /// written straight from the labels. `false`, with nothing written, otherwise.
    pub(super) fn write_plain_json(&self, out: &mut Vec<u8>) -> bool {
        if self.is_absent() {
            out.extend_from_slice(b"\"\"");
            return true;
        }
        let plain = self.labels().all(|label| {
            !label.starts_with(b"xn--")
                && label.iter().enumerate().all(|(i, &byte)| {
                    byte.is_ascii_alphanumeric()
                        || byte == b'_'
                        || (byte == b'-' && i > 0)
                        || (byte == b'*' && i == 0)
                })
        });
        if !plain {
            return false;
        }
        out.push(b'"');
        for (i, label) in self.labels().enumerate() {
            if i > 0 {
                out.push(b'.');
            }
            out.extend_from_slice(label);
        }
        if self.state == NameState::Fqdn {
            out.push(b'.');
        }
        out.push(b'"');
        true
    }
}

/// The presentation form, exactly as hickory's `Name` prints it: `\.` for a dot inside a label,
/// `\000` for bytes outside printable ASCII, IDNA labels (`xn--`) decoded.
impl fmt::Display for QueryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_absent() {
            return Ok(());
        }
        for (i, label) in self.labels().enumerate() {
            if i > 0 {
                f.write_char('.')?;
            }
            write_label(f, label)?;
        }
        if self.state == NameState::Fqdn {
            f.write_char('.')?;
        }
        Ok(())
    }
}

impl fmt::Debug for QueryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// One label as hickory's `Label` displays it. IDNA labels go through hickory itself (rare, and
/// the decoding is its business); every other label is escaped here, byte for byte the same.
fn write_label(f: &mut impl fmt::Write, label: &[u8]) -> fmt::Result {
    if label.starts_with(b"xn--")
        && let Ok(label) = Label::from_raw_bytes(label)
    {
        return write!(f, "{label}");
    }
    for (i, &byte) in label.iter().enumerate() {
        let first = i == 0;
        let safe = byte.is_ascii_alphanumeric()
            || byte == b'_'
            || (byte == b'-' && !first)
            || (byte == b'*' && first);
        if safe {
            f.write_char(char::from(byte))?;
        } else if byte > 0x20 && byte < 0x7f {
            f.write_char('\\')?;
            f.write_char(char::from(byte))?;
        } else {
            f.write_char('\\')?;
            for shift in [6, 3, 0] {
                f.write_char(char::from(b'0' + ((byte >> shift) & 7)))?;
            }
        }
    }
    Ok(())
}

/// Bytes of text kept inline; longer text goes to the heap.
const SHORT_TEXT: usize = 46;

/// A short string (a group name, a rule pattern) that is copied inline when it fits, so that
/// filling a record does not allocate.
#[derive(Clone)]
pub enum ShortText {
    Inline { len: u8, bytes: [u8; SHORT_TEXT] },
    Heap(Box<str>),
}

impl From<&str> for ShortText {
    fn from(text: &str) -> ShortText {
        let mut bytes = [0; SHORT_TEXT];
        match (bytes.get_mut(..text.len()), u8::try_from(text.len())) {
            (Some(slot), Ok(len)) => {
                slot.copy_from_slice(text.as_bytes());
                ShortText::Inline { len, bytes }
            }
            _ => ShortText::Heap(text.into()),
        }
    }
}

impl Deref for ShortText {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            ShortText::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            ShortText::Heap(text) => text,
        }
    }
}

impl fmt::Debug for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq for ShortText {
    fn eq(&self, other: &ShortText) -> bool {
        **self == **other
    }
}

/// One address handed to the client, with the TTL it was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedAddress {
    pub addr: IpAddr,
    pub ttl: u32,
}

/// Addresses kept inline; an answer with more spills the rest to the heap.
const INLINE_ADDRESSES: usize = 4;

/// The addresses of an answer: the first few inline (most answers have one to four).
#[derive(Clone, Default)]
pub struct LoggedAddresses {
    len: u8,
    inline: [Option<LoggedAddress>; INLINE_ADDRESSES],
    spilled: Vec<LoggedAddress>,
}

impl LoggedAddresses {
    pub fn push(&mut self, address: LoggedAddress) {
        match self.inline.get_mut(usize::from(self.len)) {
            Some(slot) if self.spilled.is_empty() => {
                *slot = Some(address);
                self.len += 1;
            }
            _ => self.spilled.push(address),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &LoggedAddress> {
        self.into_iter()
    }

    pub fn len(&self) -> usize {
        usize::from(self.len) + self.spilled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> IntoIterator for &'a LoggedAddresses {
    type Item = &'a LoggedAddress;
    type IntoIter = std::iter::Chain<
        std::iter::Flatten<std::slice::Iter<'a, Option<LoggedAddress>>>,
        std::slice::Iter<'a, LoggedAddress>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.inline.iter().flatten().chain(self.spilled.iter())
    }
}

impl FromIterator<LoggedAddress> for LoggedAddresses {
    fn from_iter<I: IntoIterator<Item = LoggedAddress>>(iter: I) -> LoggedAddresses {
        let mut out = LoggedAddresses::default();
        for address in iter {
            out.push(address);
        }
        out
    }
}

impl fmt::Debug for LoggedAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_print_exactly_as_hickory_prints_them() {
        let labels: &[&[&[u8]]] = &[
            &[b"api", b"example", b"com"],
            &[b"A-b_c", b"*", b"-x", b"x-"],
            &[b"evil.allowed", b"com"],
            &[b"\0\x01\x1f \x7f\xff", b"\"q\\"],
            &[b"xn--zs9h", b"xn--broken-", b"XN--zs9h"],
            &[b"caf\xc3\xa9", b"*a*"],
            &[],
        ];
        for labels in labels {
            for fqdn in [true, false] {
                let mut name = Name::from_labels(labels.iter().copied()).unwrap();
                name.set_fqdn(fqdn);
                let ours = QueryName::of(&name);
                assert_eq!(ours.to_string(), name.to_string(), "{labels:?}");
                assert_eq!(
                    ours.labels().collect::<Vec<_>>(),
                    name.iter().collect::<Vec<_>>()
                );
            }
        }
        assert_eq!(QueryName::ABSENT.to_string(), "");
        assert_eq!(QueryName::of(&Name::root()).to_string(), ".");
    }

    #[test]
    fn every_byte_escapes_as_hickory_escapes_it() {
        for byte in 0..=255u8 {
            for label in [vec![byte], vec![b'a', byte], vec![byte, b'a']] {
                let name = Name::from_labels([label.as_slice()]).unwrap();
                assert_eq!(QueryName::of(&name).to_string(), name.to_string());
            }
        }
    }

    #[test]
    fn a_wire_name_reads_like_the_parsed_one() {
        let name = Name::from_ascii("Api.Example.com.").unwrap();
        let mut wire = Vec::new();
        for label in name.iter() {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label);
        }
        wire.push(0);
        let ours = QueryName::from_wire(&wire).unwrap();
        assert_eq!(ours.to_string(), "Api.Example.com.");
        assert!(QueryName::from_wire(b"\x03api").is_none(), "no root octet");
        assert!(
            QueryName::from_wire(b"\x03api\x00\x00").is_none(),
            "trailing bytes"
        );
        assert!(QueryName::from_wire(b"\xc0\x0c").is_none(), "a pointer");
        let long: Vec<u8> = (0..5)
            .flat_map(|_| std::iter::once(63).chain([b'a'; 63]))
            .chain([0])
            .collect();
        assert!(QueryName::from_wire(&long).is_none(), "over 255 octets");
    }

    #[test]
    fn a_record_stays_small_enough_to_queue_by_value() {
        let size = std::mem::size_of::<QueryRecord>();
        println!("QueryRecord: {size} bytes");
        assert!(size <= 704, "{size} bytes");
    }

    #[test]
    fn short_text_and_addresses_keep_what_they_are_given() {
        let long = "x".repeat(SHORT_TEXT + 1);
        for text in ["", "default", &long] {
            assert_eq!(&*ShortText::from(text), text);
        }
        let addresses: LoggedAddresses = (0..7u8)
            .map(|i| LoggedAddress {
                addr: IpAddr::from([192, 0, 2, i]),
                ttl: u32::from(i),
            })
            .collect();
        assert_eq!(addresses.len(), 7);
        let ttls: Vec<u32> = addresses.iter().map(|a| a.ttl).collect();
        assert_eq!(ttls, [0, 1, 2, 3, 4, 5, 6]);
    }
}
