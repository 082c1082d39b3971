//! A query record as one JSON line, written on the writer thread.
//!
//! Hand-written rather than derived: the record's fields are raw (a name in wire form, a type
//! number), and writing them straight into the line buffer avoids building strings first. The
//! output is byte for byte what `serde_json` wrote for the former derived form (same key order,
//! same escaping, optional keys left out the same way); the tests below hold it to that.

use std::fmt::Write as _;
use std::io::Write as _;

use hickory_proto::op::ResponseCode;

use super::QueryRecord;

/// Appends `record` as one JSON object (without the newline) to `out`.
pub(super) fn write_query(out: &mut Vec<u8>, record: &QueryRecord) {
    let mut text = String::new();
    out.extend_from_slice(b"{\"time\":\"");
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{}", humantime::format_rfc3339_micros(record.time));
    out.extend_from_slice(b"\",\"policy\":");
    string(out, record.policy.as_str());
    out.extend_from_slice(b",\"client\":\"");
    let _ = write!(out, "{}", record.client);
    out.extend_from_slice(b"\",\"port\":");
    let _ = write!(out, "{}", record.port);
    out.extend_from_slice(b",\"transport\":");
    string(out, record.transport);
    out.extend_from_slice(b",\"qname\":");
    let _ = write!(text, "{}", record.qname);
    string(out, &text);
    out.extend_from_slice(b",\"qtype\":");
    text.clear();
    if let Some(qtype) = record.qtype {
        let _ = write!(text, "{qtype}");
    }
    string(out, &text);
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
        let _ = write!(out, "{grant}\"");
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
        let _ = write!(
            out,
            "{{\"addr\":\"{}\",\"ttl\":{}}}",
            answer.addr, answer.ttl
        );
    }
    out.push(b']');
    if !record.refused.is_empty() {
        out.extend_from_slice(b",\"refused\":[");
        for (i, addr) in record.refused.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = write!(out, "\"{addr}\"");
        }
        out.push(b']');
    }
    if let Some(upstream) = record.upstream {
        let _ = write!(out, ",\"upstream\":\"{upstream}\"");
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
    let _ = write!(out, ",\"latency_us\":{}}}", record.latency_us);
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
