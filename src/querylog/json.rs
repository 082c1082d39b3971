//! A query record as one JSON line, written on the writer thread.
//!
//! Hand-written rather than derived: the record's fields are raw (a name in wire form, a type
//! number), and writing them straight into the line buffer avoids building strings first. The
//! output is byte for byte what `serde_json` wrote for the former derived form (same key order,
//! same escaping, optional keys left out the same way); the tests below hold it to that.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;

use super::QueryRecord;

/// Formats query lines; keeps the text of the last second it stamped, so that a burst of
/// records from the same second formats its date and time once (the writer thread keeps one).
#[derive(Default)]
pub struct LineFormat {
    /// The second `stamp` spells, since the epoch.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS`, as humantime writes it.
    stamp: Vec<u8>,
}

impl LineFormat {
    /// Appends `record` as one JSON object (without the newline) to `out`.
    pub fn write(&mut self, out: &mut Vec<u8>, record: &QueryRecord) {
        out.extend_from_slice(b"{\"time\":\"");
        self.time(out, record.time);
        out.extend_from_slice(b"\",\"policy\":");
        string(out, record.policy.as_str());
        out.extend_from_slice(b",\"client\":\"");
        ip(out, record.client);
        out.extend_from_slice(b"\",\"port\":");
        integer(out, u64::from(record.port));
        out.extend_from_slice(b",\"transport\":");
        string(out, record.transport);
        out.extend_from_slice(b",\"qname\":");
        if !record.qname.write_plain_json(out) {
            let mut text = String::new();
            let _ = write!(text, "{}", record.qname);
            string(out, &text);
        }
        out.extend_from_slice(b",\"qtype\":");
        string(out, record.qtype.map_or("", <&str>::from));
        out.extend_from_slice(b",\"decision\":");
        string(out, record.decision);
        if let Some(group) = &record.group {
            out.extend_from_slice(b",\"group\":");
            string(out, group);
        }
        if let Some(rule) = &record.rule {
            out.extend_from_slice(b",\"rule\":");
            string(out, rule);
        }
        if let Some(grant) = record.grant {
            out.extend_from_slice(b",\"grant\":\"g");
            integer(out, grant);
            out.push(b'"');
        }
        if let Some(reason) = record.reason {
            out.extend_from_slice(b",\"reason\":");
            string(out, reason);
        }
        out.extend_from_slice(b",\"rcode\":\"");
        rcode(out, record.rcode);
        out.extend_from_slice(b"\",\"answers\":[");
        for (i, answer) in record.answers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"addr\":\"");
            ip(out, answer.addr);
            out.extend_from_slice(b"\",\"ttl\":");
            integer(out, u64::from(answer.ttl));
            out.push(b'}');
        }
        out.push(b']');
        if !record.refused.is_empty() {
            out.extend_from_slice(b",\"refused\":[");
            for (i, &addr) in record.refused.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                ip(out, addr);
                out.push(b'"');
            }
            out.push(b']');
        }
        if let Some(upstream) = record.upstream {
            out.extend_from_slice(b",\"upstream\":\"");
            match upstream {
                SocketAddr::V4(v4) => {
                    ip(out, IpAddr::V4(*v4.ip()));
                    out.push(b':');
                    integer(out, u64::from(v4.port()));
                }
                // Brackets, a scope id: rare enough for std's own formatting.
                SocketAddr::V6(v6) => {
                    let _ = write!(out, "{v6}");
                }
            }
            out.push(b'"');
        }
        if let Some(error) = &record.error {
            out.extend_from_slice(b",\"error\":");
            string(out, error);
        }
        if record.truncated {
            out.extend_from_slice(b",\"truncated\":true");
        }
        if record.audit {
            out.extend_from_slice(b",\"audit\":true");
        }
        out.extend_from_slice(b",\"latency_us\":");
        integer(out, record.latency_us);
        out.push(b'}');
    }

    /// `time` as humantime's RFC 3339 with microseconds (`2026-11-30T08:37:01.123456Z`): the
    /// date and time of day come from `stamp` when the second is the one last written.
    fn time(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        // A clock set before 1970 is written as the epoch (humantime would panic).
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            self.stamp.clear();
            let _ = write!(
                self.stamp,
                "{}",
                humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + std::time::Duration::from_secs(second)
                )
            );
            // Without the `Z`: the fraction goes before it.
            self.stamp.pop();
            self.second = Some(second);
        }
        out.extend_from_slice(&self.stamp);
        out.push(b'.');
        let micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut rest = micros;
        for slot in digits.iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
    }
}

/// Appends `record` as one JSON object (without the newline) to `out`.
pub(super) fn write_query(out: &mut Vec<u8>, record: &QueryRecord) {
    LineFormat::default().write(out, record);
}

/// `value` in decimal, as `Display` writes it.
fn integer(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(slot) = digits.get_mut(at) {
            *slot = b'0' + (value % 10) as u8;
        }
        value /= 10;
        if value == 0 || at == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(at..).unwrap_or_default());
}

/// One octet in decimal, without leading zeros.
fn octet(out: &mut Vec<u8>, byte: u8) {
    if byte >= 100 {
        out.push(b'0' + byte / 100);
    }
    if byte >= 10 {
        out.push(b'0' + byte / 10 % 10);
    }
    out.push(b'0' + byte % 10);
}

/// An address as `Display` writes it: IPv4 here, IPv6 (zero compression, mapped forms) by std.
fn ip(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => {
            let [first, rest @ ..] = v4.octets();
            octet(out, first);
            for byte in rest {
                out.push(b'.');
                octet(out, byte);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn rcode(out: &mut Vec<u8>, rcode: ResponseCode) {
    let mnemonic = match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        other => {
            let _ = write!(out, "RCODE{}", u16::from(other));
            return;
        }
    };
    out.extend_from_slice(mnemonic.as_bytes());
}

/// A JSON string, escaped as `serde_json` escapes it: `"` and `\` with a backslash, the control
/// characters with their short forms or `\u00XX` (lower-case hex), everything else as is.
fn string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    // Nearly every string (a policy tag, a group, a rule, a reason) needs no escape at all.
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..0x20 => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, SystemTime};

    use hickory_proto::rr::{Name, RecordType};
    use serde::Serialize;

    use super::*;
    use crate::querylog::{LoggedAddress, PolicyTag, ShortText};

    /// The record as it was before the fields were handed over raw, serialized by serde: the
    /// reference the hand-written line must match byte for byte.
    #[derive(Serialize)]
    struct Reference {
        time: String,
        policy: String,
        client: IpAddr,
        port: u16,
        transport: &'static str,
        qname: String,
        qtype: String,
        decision: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        grant: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
        rcode: String,
        answers: Vec<ReferenceAddress>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        refused: Vec<IpAddr>,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream: Option<SocketAddr>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        audit: bool,
        latency_us: u64,
    }

    #[derive(Serialize)]
    struct ReferenceAddress {
        addr: IpAddr,
        ttl: u32,
    }

    fn reference(r: &QueryRecord, name: Option<&Name>) -> String {
        let rcode = match r.rcode {
            ResponseCode::NoError => "NOERROR".to_owned(),
            ResponseCode::FormErr => "FORMERR".to_owned(),
            ResponseCode::ServFail => "SERVFAIL".to_owned(),
            ResponseCode::NXDomain => "NXDOMAIN".to_owned(),
            ResponseCode::NotImp => "NOTIMP".to_owned(),
            ResponseCode::Refused => "REFUSED".to_owned(),
            other => format!("RCODE{}", u16::from(other)),
        };
        serde_json::to_string(&Reference {
            time: humantime::format_rfc3339_micros(r.time).to_string(),
            policy: r.policy.to_string(),
            client: r.client,
            port: r.port,
            transport: r.transport,
            qname: name.map(Name::to_string).unwrap_or_default(),
            qtype: r.qtype.map(|t| t.to_string()).unwrap_or_default(),
            decision: r.decision,
            group: r.group.as_deref().map(str::to_owned),
            rule: r.rule.as_deref().map(str::to_owned),
            grant: r.grant.map(|id| format!("g{id}")),
            reason: r.reason,
            rcode,
            answers: r
                .answers
                .iter()
                .map(|a| ReferenceAddress {
                    addr: a.addr,
                    ttl: a.ttl,
                })
                .collect(),
            refused: r.refused.clone(),
            upstream: r.upstream,
            error: r.error.clone(),
            truncated: r.truncated,
            audit: r.audit,
            latency_us: r.latency_us,
        })
        .unwrap()
    }

    fn line(r: &QueryRecord) -> String {
        let mut out = Vec::new();
        write_query(&mut out, r);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn one_formatter_across_seconds_and_addresses_writes_what_serde_wrote() {
        let mut format = LineFormat::default();
        let base = 1_795_000_000u64;
        let cases: &[(u64, u32, &str, &str, u16, u64)] = &[
            // (second offset, micros, client, upstream, port, latency)
            (0, 0, "0.0.0.0", "9.9.9.9:53", 0, 0),
            (0, 999_999, "255.255.255.255", "127.0.0.1:65535", 65535, 1),
            (0, 10, "10.20.30.40", "[::1]:53", 53, 9),
            (1, 100_000, "::ffff:192.0.2.1", "1.2.3.4:5353", 1, 10),
            (1, 5, "2001:db8::1", "[2001:db8::2%3]:53", 10, 99),
            (86_399, 123_456, "192.0.2.7", "192.0.2.1:53", 100, 100),
            (86_400, 1, "100.64.0.1", "10.0.0.1:1053", 1000, 1_000_000),
            (
                3_000_000_000,
                42,
                "8.8.4.4",
                "8.8.8.8:53",
                60000,
                12_345_678_901,
            ),
        ];
        for &(offset, micros, client, upstream, port, latency) in cases {
            let client: IpAddr = client.parse().unwrap();
            let mut r = QueryRecord::new(SocketAddr::new(client, port), "udp").with_question(
                &Name::from_ascii("Api-1.x_y.*.example.").unwrap(),
                RecordType::A,
            );
            r.time = SystemTime::UNIX_EPOCH
                + Duration::from_secs(base + offset)
                + Duration::from_micros(u64::from(micros))
                + Duration::from_nanos(999);
            r.upstream = Some(upstream.parse().unwrap());
            r.latency_us = latency;
            r.grant = Some(latency);
            r.answers = [client, "203.0.113.9".parse().unwrap()]
                .into_iter()
                .map(|addr| LoggedAddress { addr, ttl: micros })
                .collect();
            r.refused = vec![client];
            let mut out = Vec::new();
            format.write(&mut out, &r);
            let expected = reference(&r, Some(&Name::from_ascii("Api-1.x_y.*.example.").unwrap()));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn every_octet_and_every_escape_reads_as_std_and_serde_write_them() {
        for byte in 0..=255u8 {
            for addr in [[byte, 0, 9, byte], [1, byte, byte, 255]] {
                let addr = IpAddr::from(addr);
                let mut out = Vec::new();
                ip(&mut out, addr);
                assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
            }
            let text = format!("a{}b", char::from(byte));
            if let Ok(expected) = serde_json::to_string(&text) {
                let mut out = Vec::new();
                string(&mut out, &text);
                assert_eq!(String::from_utf8(out).unwrap(), expected, "{byte}");
            }
        }
        for value in [0, 1, 9, 10, 99, 100, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            integer(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), value.to_string());
        }
    }

    #[test]
    fn plain_and_escaped_names_alike_read_as_hickory_prints_them() {
        let names: &[(&[&[u8]], bool)] = &[
            (&[b"a"], true),
            (&[b"a"], false),
            (&[], true),
            (&[b"-a", b"b"], true),
            (&[b"a-", b"B"], true),
            (&[b"*", b"x"], true),
            (&[b"a*", b"x"], true),
            (&[b"_srv", b"_tcp", b"x"], true),
            (&[b"xn--zs9h", b"x"], true),
            (&[b"x", b"XN--zs9h"], true),
            (&[b"a.b", b"c"], true),
            (&[b"a\"b\\"], true),
            (&[b"a\0b\xff", b" "], false),
        ];
        let mut format = LineFormat::default();
        for &(labels, fqdn) in names {
            let mut name = Name::from_labels(labels.iter().copied()).unwrap();
            name.set_fqdn(fqdn);
            let mut r = QueryRecord::new("192.0.2.1:1".parse().unwrap(), "udp")
                .with_question(&name, RecordType::TXT);
            r.time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
            let mut out = Vec::new();
            format.write(&mut out, &r);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                reference(&r, Some(&name)),
                "{labels:?}"
            );
        }
    }

    #[test]
    fn lines_are_byte_identical_to_the_serde_form() {
        let client: SocketAddr = "[2001:db8::7]:53124".parse().unwrap();
        let time = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        let names: Vec<Name> = vec![
            Name::from_ascii("api.example.com.").unwrap(),
            Name::from_labels([b"q\"uo\\te".as_slice(), b"\0\n\t\x7f\xe9"]).unwrap(),
            Name::from_labels([b"xn--zs9h".as_slice(), b"test"]).unwrap(),
            Name::root(),
        ];
        let mut records = Vec::new();
        let bare = QueryRecord::new("127.0.0.1:5300".parse().unwrap(), "udp");
        records.push((bare.clone(), None));
        for (i, name) in names.iter().enumerate() {
            let mut r = QueryRecord::new(client, "tcp").with_question(name, RecordType::AAAA);
            r.time = time;
            r.policy = PolicyTag::of_hex("0123456789ABCDEFfff");
            r.decision = "allow";
            r.group = Some(ShortText::from("agents \"x\""));
            r.rule = Some(ShortText::from(
                &*"**.long-rule-pattern.example".repeat(i + 1),
            ));
            r.grant = Some(u64::MAX - i as u64);
            r.reason = Some("policy");
            r.rcode = [
                ResponseCode::NXDomain,
                ResponseCode::Unknown(3841),
                ResponseCode::BADCOOKIE,
                ResponseCode::ServFail,
            ][i];
            r.answers = (0..i + 3)
                .map(|n| LoggedAddress {
                    addr: if n % 2 == 0 {
                        IpAddr::from([198, 51, 100, n as u8])
                    } else {
                        "::ffff:10.0.0.1".parse().unwrap()
                    },
                    ttl: u32::MAX - n as u32,
                })
                .collect();
            r.refused = vec!["10.0.0.1".parse().unwrap(), "fe80::1".parse().unwrap()];
            r.upstream = Some("[fe80::1%7]:53".parse().unwrap());
            r.error = Some("bad\u{1}\u{8}\u{c}\r\n\"\\ é \u{7f}".into());
            r.truncated = true;
            r.audit = i % 2 == 0;
            r.latency_us = u64::MAX;
            records.push((r, Some(name.clone())));
        }
        let mut minimal =
            QueryRecord::new(client, "udp").with_question(&names[0], RecordType::Unknown(65280));
        minimal.time = time;
        records.push((minimal, Some(names[0].clone())));
        for (r, name) in &records {
            assert_eq!(line(r), reference(r, name.as_ref()));
        }
    }
}
