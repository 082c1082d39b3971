//! The query log: one JSON object per query, one per line, flushed as it happens; events
//! (`"event":"mode"`, ...) are lines of their own with an `event` key.
//!
//! It is what an operator tails to see what an agent tried (`jq 'select(.decision=="deny")'`).
//!
//! ```text
//!  answering thread                         │ writer thread (dnsfence-querylog)
//!  QueryRecord: raw fields, fixed size ─────┼─► bounded queue ─► json::LineFormat ─► file
//!  (name in wire form, type as a number,    │   (full: dropped    (escaping, addresses,
//!   short inline text; no formatting)       │    and counted)      time: all formatted here)
//! ```
//!
//! The answering thread fills a [`QueryRecord`] with the raw fields (see [`record`]: nothing
//! is formatted and, for ordinary answers, nothing allocated) and queues it without blocking;
//! every string is built by the writer thread, so a slow disk never stalls a query and the
//! formatting costs the answering thread nothing. When the queue is full the record is dropped
//! and counted rather than letting an agent's flood grow memory; the count is reported on
//! stderr and in the metrics.
//!
//! Every query line names the policy that decided it (`policy`: the first 12 hex digits of the
//! policy file's SHA-256), so a line can be tied to the reload that preceded it.

use crate::stage_times::{Span, Stage};
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::SystemTime;

use serde::Serialize;

use crate::policy::LogTarget;

mod json;
mod record;

pub use json::LineFormat;
pub use record::{LoggedAddress, LoggedAddresses, QueryName, QueryRecord, ShortText};

/// Records waiting to be written before new ones are dropped: about 50 ms at 150,000 queries
/// per second, ten times the writer's cadence. A record is queued by value (about 700 bytes:
/// the name's buffer is most of it), so the queue holds about 6 MB when full.
const QUEUE_LEN: usize = 8_192;

/// After writing a burst the writer rests this long before it waits on the queue again. While
/// it rests, queueing a record wakes nobody: under load one wake-up serves hundreds of records
/// instead of each record costing a thread switch. An idle log still writes at once.
const WRITE_CADENCE: std::time::Duration = std::time::Duration::from_millis(5);

/// The short form of a policy's SHA-256 (12 hex digits) that every query line carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PolicyTag([u8; PolicyTag::LEN]);

/// Twelve zeros (a tag of no policy), never NUL bytes in a log line.
impl Default for PolicyTag {
    fn default() -> PolicyTag {
        PolicyTag([b'0'; PolicyTag::LEN])
    }
}

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
#[derive(Debug, Clone)]
// Queries are nearly every line: boxing them would cost an allocation per query to save bytes
// on the rare event.
#[allow(clippy::large_enum_variant)]
enum LogLine {
    Query(QueryRecord),
    Event(EventRecord),
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
    let mut line = Vec::with_capacity(1024);
    let mut format = json::LineFormat::default();
    while let Ok(first) = receiver.recv() {
        let burst = Span::start();
        let mut next = Some(first);
        // Write whatever is queued, then flush once: one syscall per burst, and nothing sits in
        // the buffer while the queue is idle.
        while let Some(record) = next {
            write_line(&mut out, &mut line, &mut format, &record, &mut failing);
            next = receiver.try_recv().ok();
        }
        if let Err(error) = out.flush() {
            report_write_error(&error, &mut failing);
        }
        burst.end(Stage::LogBurst);
        std::thread::sleep(WRITE_CADENCE);
    }
}

/// Formats one line into `line` (reused: no allocation per line) and writes it whole.
fn write_line(
    out: &mut impl Write,
    line: &mut Vec<u8>,
    format: &mut json::LineFormat,
    record: &LogLine,
    failing: &mut bool,
) {
    line.clear();
    let formatted = match record {
        LogLine::Query(query) => {
            format.write(line, query);
            Ok(())
        }
        LogLine::Event(event) => serde_json::to_writer(&mut *line, event).map_err(io::Error::from),
    };
    line.push(b'\n');
    let result = formatted.and_then(|()| out.write_all(line));
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
