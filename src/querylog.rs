//! The query log: one JSON object per query, one per line, flushed as it happens; events
//! (`"event":"mode"`, ...) are lines of their own with an `event` key.
//!
//! It is what an operator tails to see what an agent tried (`jq 'select(.decision=="deny")'`).
//! Records go through a bounded channel to a dedicated writer thread, so a slow disk never
//! stalls a query and serialization stays off the query path. When the channel is full the
//! record is dropped and counted rather than letting an agent's flood grow memory; the count is
//! reported on stderr.
//!
//! Every query line names the policy that decided it (`policy`: the first 12 hex digits of the
//! policy file's SHA-256), so a line can be tied to the reload that preceded it.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::SystemTime;

use hickory_proto::op::ResponseCode;
use serde::Serialize;

use crate::policy::LogTarget;

/// Records waiting to be written before new ones are dropped: about 100 ms at 150,000 queries
/// per second.
const QUEUE_LEN: usize = 16_384;

/// After writing a burst the writer rests this long before it waits on the queue again. While
/// it rests, queueing a record wakes nobody: under load one wake-up serves hundreds of records
/// instead of each record costing a thread switch. An idle log still writes at once.
const WRITE_CADENCE: std::time::Duration = std::time::Duration::from_millis(5);

/// One address handed to the client, with the TTL it was told.
#[derive(Debug, Clone, Serialize)]
pub struct LoggedAddress {
    pub addr: IpAddr,
    pub ttl: u32,
}

/// The short form of a policy's SHA-256 (12 hex digits) that every query line carries.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyTag([u8; PolicyTag::LEN]);

impl PolicyTag {
    pub const LEN: usize = 12;

    /// The tag of a full hex digest (its first [`Self::LEN`] digits).
    pub fn of_hex(hex: &str) -> PolicyTag {
        let mut tag = [b'0'; PolicyTag::LEN];
        for (slot, byte) in tag.iter_mut().zip(hex.bytes()) {
            if byte.is_ascii_hexdigit() {
                *slot = byte.to_ascii_lowercase();
            }
        }
        PolicyTag(tag)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("000000000000")
    }
}

impl std::fmt::Debug for PolicyTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for PolicyTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PolicyTag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One line of the query log.
#[derive(Debug, Clone, Serialize)]
pub struct QueryRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// The policy that decided this query ([`PolicyTag`]).
    pub policy: PolicyTag,
    pub client: IpAddr,
    pub port: u16,
    pub transport: &'static str,
    /// The name as received, in presentation form with every unusual byte escaped.
    pub qname: String,
    pub qtype: String,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The client group whose allowlist applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The rule that allowed the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The temporary grant that allowed the name (`g<id>`), when a grant did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// Why the query was denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The response code sent, as dig prints it: NOERROR, NXDOMAIN, SERVFAIL, REFUSED, ...
    #[serde(serialize_with = "rcode_mnemonic")]
    pub rcode: ResponseCode,
    pub answers: Vec<LoggedAddress>,
    /// Answer addresses the address guard took out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    /// Why an allowed query failed (upstream down, firewall admission refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// A denial that audit mode let through: forwarded and admitted anyway.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    pub latency_us: u64,
}

/// A line of the query log that is not a query: something dnsfence did or saw by itself
/// (`"event":"mode"` when audit mode ends). Rare, so its fields are a free-form map.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub event: &'static str,
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl EventRecord {
    pub fn new(event: &'static str) -> EventRecord {
        EventRecord {
            time: SystemTime::now(),
            event,
            fields: serde_json::Map::new(),
        }
    }

    /// Adds a key (values that cannot be represented in JSON are written as null).
    pub fn with(mut self, key: &str, value: impl Serialize) -> EventRecord {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.fields.insert(key.to_owned(), value);
        self
    }
}

/// One line of the log.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
// Queries are nearly every line: boxing them would cost an allocation per query to save bytes
// on the rare event.
#[allow(clippy::large_enum_variant)]
enum LogLine {
    Query(QueryRecord),
    Event(EventRecord),
}

fn rcode_mnemonic<S: serde::Serializer>(rcode: &ResponseCode, s: S) -> Result<S::Ok, S::Error> {
    match rcode {
        ResponseCode::NoError => s.serialize_str("NOERROR"),
        ResponseCode::FormErr => s.serialize_str("FORMERR"),
        ResponseCode::ServFail => s.serialize_str("SERVFAIL"),
        ResponseCode::NXDomain => s.serialize_str("NXDOMAIN"),
        ResponseCode::NotImp => s.serialize_str("NOTIMP"),
        ResponseCode::Refused => s.serialize_str("REFUSED"),
        other => s.collect_str(&format_args!("RCODE{}", u16::from(*other))),
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*time))
}

/// Something that sees every query record before it is queued (the metrics counters).
pub type Observer = Arc<dyn Fn(&QueryRecord) + Send + Sync>;

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct QueryLog {
    sender: SyncSender<LogLine>,
    dropped: Arc<AtomicU64>,
    observer: Option<Observer>,
}

/// Owns the writer thread; dropping every [`QueryLog`] and joining this flushes the tail.
pub struct QueryLogWriter {
    thread: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl QueryLog {
    /// Opens `target` (appending to a file) and starts the writer thread.
    pub fn open(target: &LogTarget) -> io::Result<(QueryLog, QueryLogWriter)> {
        let sink: Box<dyn Write + Send> = match target {
            LogTarget::Stdout => Box::new(io::stdout()),
            LogTarget::File(path) => Box::new(open_append(path)?),
        };
        let (sender, receiver) = mpsc::sync_channel(QUEUE_LEN);
        let dropped = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("dnsfence-querylog".into())
            .spawn(move || write_records(receiver, BufWriter::new(sink)))?;
        Ok((
            QueryLog {
                sender,
                dropped: dropped.clone(),
                observer: None,
            },
            QueryLogWriter {
                thread: Some(thread),
                dropped,
            },
        ))
    }

    /// Shows every later record to `observer` first (it must be quick: it runs on the query
    /// path).
    pub fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// How many records were dropped because the writer could not keep up.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    /// Queues one record; never blocks.
    pub fn record(&self, record: QueryRecord) {
        if let Some(observer) = &self.observer {
            observer(&record);
        }
        self.queue(LogLine::Query(record));
    }

    /// Queues one event; never blocks. Events are rare and say what changed (a reload, a
    /// grant), so unlike query records they are not dropped when the queue is full: a thread
    /// of their own waits for room (the writer drains the queue within milliseconds).
    pub fn event(&self, event: EventRecord) {
        match self.sender.try_send(LogLine::Event(event)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(line)) => {
                let sender = self.sender.clone();
                let spawned = std::thread::Builder::new()
                    .name("dnsfence-querylog-event".into())
                    .spawn(move || {
                        let _ = sender.send(line);
                    });
                if spawned.is_err() {
                    tracing::warn!("query log full: an event line was dropped");
                }
            }
        }
    }

    fn queue(&self, line: LogLine) {
        match self.sender.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let before = self.dropped.fetch_add(1, Ordering::Relaxed);
                if before.is_power_of_two() {
                    tracing::warn!(
                        dropped = before + 1,
                        "query log cannot keep up; records dropped"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl QueryLogWriter {
    /// Waits until every queued record is written (all senders must be gone).
    pub fn finish(mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("query log writer thread panicked");
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "query log records were dropped under load");
        }
    }
}

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}

fn write_records(receiver: Receiver<LogLine>, mut out: BufWriter<Box<dyn Write + Send>>) {
    let mut failing = false;
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        // Write whatever is queued, then flush once: one syscall per burst, and nothing sits in
        // the buffer while the queue is idle.
        while let Some(record) = next {
            write_line(&mut out, &record, &mut failing);
            next = receiver.try_recv().ok();
        }
        if let Err(error) = out.flush() {
            report_write_error(&error, &mut failing);
        }
        std::thread::sleep(WRITE_CADENCE);
    }
}

fn write_line(out: &mut impl Write, record: &LogLine, failing: &mut bool) {
    let result = serde_json::to_writer(&mut *out, record)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"));
    match result {
        Ok(()) => *failing = false,
        Err(error) => report_write_error(&error, failing),
    }
}

fn report_write_error(error: &io::Error, failing: &mut bool) {
    if !*failing {
        tracing::error!(%error, "cannot write the query log");
        *failing = true;
    }
}
