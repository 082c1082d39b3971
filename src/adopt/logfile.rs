//! Reading query logs back: the JSON lines `serve` wrote, in any mode, from several files.
//!
//! A log is evidence, not configuration, so reading it is forgiving: a line that is not a query
//! record (an event, a line cut short by a crash or a rotation) is counted and skipped rather
//! than stopping the whole read, and the caller says how many were skipped.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use hickory_proto::rr::{Name, RecordType};
use serde::Deserialize;

/// One query as the log tells it.
#[derive(Debug, Clone)]
pub struct LoggedQuery {
    pub time: SystemTime,
    pub client: IpAddr,
    /// The name as received, in presentation form (escapes kept).
    pub qname: String,
    pub qtype: String,
    /// `allow` or `deny`.
    pub decision: String,
    pub reason: Option<String>,
    pub group: Option<String>,
    pub rule: Option<String>,
    pub error: Option<String>,
    /// A denial that audit mode let through.
    pub audit: bool,
    pub answers: Vec<LoggedAnswer>,
}

/// One address handed out, and for how long the client was told it holds.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct LoggedAnswer {
    pub addr: IpAddr,
    pub ttl: u32,
}

impl LoggedQuery {
    /// The question as wire name and type, when the log's text reads back as one.
    pub fn question(&self) -> Option<(Name, RecordType)> {
        let mut name = Name::from_ascii(&self.qname).ok()?;
        name.set_fqdn(true);
        let qtype = RecordType::from_str(&self.qtype).ok()?;
        Some((name, qtype))
    }

    /// The name without its trailing dot, as rules are written.
    pub fn bare_name(&self) -> &str {
        self.qname.strip_suffix('.').unwrap_or(&self.qname)
    }
}

#[derive(Deserialize)]
struct Line {
    time: String,
    client: IpAddr,
    qname: String,
    qtype: String,
    decision: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    answers: Vec<LoggedAnswer>,
}

/// The queries of some logs, and what could not be read.
#[derive(Debug, Default)]
pub struct LogRead {
    pub queries: Vec<LoggedQuery>,
    /// Lines that were events or not query records at all.
    pub skipped: usize,
    /// Queries older than the `since` bound.
    pub older: usize,
}

/// Reads every query of `paths` at or after `since`, in file order.
pub fn read_logs(paths: &[PathBuf], since: Option<SystemTime>) -> Result<LogRead, String> {
    let mut read = LogRead::default();
    for path in paths {
        read_one(path, since, &mut read)?;
    }
    Ok(read)
}

fn read_one(path: &Path, since: Option<SystemTime>, read: &mut LogRead) -> Result<(), String> {
    let file = std::fs::File::open(path)
        .map_err(|error| format!("cannot read the query log {}: {error}", path.display()))?;
    for line in BufReader::new(file).lines() {
        let line =
            line.map_err(|error| format!("cannot read the query log {}: {error}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let Some(query) = parse_line(&line) else {
            read.skipped += 1;
            continue;
        };
        if since.is_some_and(|since| query.time < since) {
            read.older += 1;
            continue;
        }
        read.queries.push(query);
    }
    Ok(())
}

fn parse_line(line: &str) -> Option<LoggedQuery> {
    let line: Line = serde_json::from_str(line).ok()?;
    let time = humantime::parse_rfc3339(&line.time).ok()?;
    Some(LoggedQuery {
        time,
        client: line.client,
        qname: line.qname,
        qtype: line.qtype,
        decision: line.decision,
        reason: line.reason,
        group: line.group,
        rule: line.rule,
        error: line.error,
        audit: line.audit,
        answers: line.answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_lines_parse_and_events_and_torn_lines_do_not() {
        let query = r#"{"time":"2026-11-29T23:52:30.123456Z","client":"10.0.0.7","port":5353,"transport":"udp","qname":"api.example.org.","qtype":"A","decision":"deny","group":"default","reason":"policy","rcode":"NOERROR","answers":[{"addr":"198.51.100.1","ttl":300}],"audit":true,"latency_us":12}"#;
        let parsed = parse_line(query).unwrap();
        assert!(parsed.audit);
        assert_eq!(parsed.bare_name(), "api.example.org");
        assert_eq!(parsed.answers.len(), 1);
        assert_eq!(parsed.question().unwrap().1, RecordType::A);
        let event = r#"{"time":"2026-11-29T23:52:39Z","event":"mode","mode":"enforce"}"#;
        assert!(parse_line(event).is_none());
        assert!(parse_line(&query[..40]).is_none());
    }
}
