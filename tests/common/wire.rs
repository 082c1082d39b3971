//! Hand-built DNS wire messages and raw exchanges, for what a well-behaved encoder would refuse
//! to produce (labels with dots or NUL bytes, pointer loops, odd classes and opcodes, EDNS
//! options) and for reading replies without trusting a parser.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;
pub const CLASS_CH: u16 = 3;
pub const CLASS_HS: u16 = 4;
pub const CLASS_NONE: u16 = 254;
pub const CLASS_ANY: u16 = 255;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// A 12-byte header. `flags` is the raw second 16-bit word (QR, opcode, AA, TC, RD, RA, rcode).
pub fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    for word in [id, flags, qd, an, ns, ar] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out
}

/// Flags of a standard query with RD set and the given opcode.
pub fn query_flags(opcode: u8) -> u16 {
    (u16::from(opcode & 0x0f) << 11) | 0x0100
}

/// A name in wire form from raw labels, without any check (lengths are written as given, so a
/// label longer than 63 bytes produces an invalid length octet on purpose).
pub fn encode_name<L: AsRef<[u8]>>(labels: &[L]) -> Vec<u8> {
    let mut out = Vec::new();
    for label in labels {
        let label = label.as_ref();
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// Splits presentation text on dots into labels (test names only: no escapes).
pub fn labels(text: &str) -> Vec<Vec<u8>> {
    text.trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// One question, RD set, no EDNS.
pub fn query<L: AsRef<[u8]>>(id: u16, labels: &[L], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut out = header(id, query_flags(0), 1, 0, 0, 0);
    out.extend(encode_name(labels));
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&qclass.to_be_bytes());
    out
}

/// An OPT pseudo-record advertising `payload` and carrying `options` (code, data).
pub fn opt_rr(payload: u16, dnssec_ok: bool, options: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut rdata = Vec::new();
    for (code, data) in options {
        rdata.extend_from_slice(&code.to_be_bytes());
        rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
        rdata.extend_from_slice(data);
    }
    let mut out = vec![0u8]; // root owner
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend(rdata);
    out
}

/// One question with an OPT record.
pub fn query_with_opt<L: AsRef<[u8]>>(
    id: u16,
    labels: &[L],
    qtype: u16,
    payload: u16,
    options: &[(u16, Vec<u8>)],
) -> Vec<u8> {
    let mut out = query(id, labels, qtype, CLASS_IN);
    out[10..12].copy_from_slice(&1u16.to_be_bytes());
    out.extend(opt_rr(payload, false, options));
    out
}

/// The header of a reply, read by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub id: u16,
    pub qr: bool,
    pub opcode: u8,
    pub tc: bool,
    pub rcode: u8,
    pub qd: u16,
    pub an: u16,
    pub ns: u16,
    pub ar: u16,
}

pub fn parse_header(bytes: &[u8]) -> Option<RawHeader> {
    let b = bytes.get(..12)?;
    let word = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    Some(RawHeader {
        id: word(0),
        qr: b[2] & 0x80 != 0,
        opcode: (b[2] >> 3) & 0x0f,
        tc: b[2] & 0x02 != 0,
        rcode: b[3] & 0x0f,
        qd: word(4),
        an: word(6),
        ns: word(8),
        ar: word(10),
    })
}

/// Sends one datagram and waits up to `wait` for one reply; `None` when none came.
pub fn udp_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    socket.send_to(bytes, addr).unwrap();
    let mut buf = vec![0u8; 65535];
    match socket.recv_from(&mut buf) {
        Ok((len, _)) => {
            buf.truncate(len);
            Some(buf)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("udp receive: {e}"),
    }
}

/// Prefixes a message with its 16-bit length.
pub fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// What happened to a TCP connection while waiting for a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOutcome {
    Reply(Vec<u8>),
    /// The server closed (or reset) the connection.
    Closed,
    /// Nothing within the wait.
    Silent,
}

/// Reads one length-prefixed message, waiting up to `wait` for its first byte.
pub fn read_frame(stream: &mut TcpStream, wait: Duration) -> TcpOutcome {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return TcpOutcome::Silent;
        }
        Err(_) => return TcpOutcome::Closed,
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    match stream.read_exact(&mut buf) {
        Ok(()) => TcpOutcome::Reply(buf),
        Err(_) => TcpOutcome::Closed,
    }
}

/// Opens a connection, sends `bytes` framed, and reads one reply.
pub fn tcp_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> TcpOutcome {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    stream.write_all(&frame(bytes)).unwrap();
    read_frame(&mut stream, wait)
}

/// Waits up to `within` for the server to close `stream` (EOF or reset), discarding anything it
/// sends; returns how long that took, or `None` if the connection was still open.
pub fn time_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}
