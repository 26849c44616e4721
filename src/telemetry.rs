//! Logging setup: `tracing` events as text or JSON, filtered by
//! `TOLLGATE_LOG` (or `RUST_LOG`), default `info`; and the access log's own
//! writer, which keeps one line per request off the request path.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = std::env::var("TOLLGATE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only for a person at a terminal, and never under NO_COLOR
    // (no-color.org): log files and collectors get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    FORMAT.store(format as u8, Ordering::Relaxed);
}

static FORMAT: AtomicU8 = AtomicU8::new(LogFormat::Text as u8);

// The access log. Each worker thread renders its lines into a buffer of its
// own (no lock, no allocation per line) and hands a full buffer, or what it
// has every `FLUSH_EVERY`, to one writer thread through a bounded queue.
// When the queue is full (stderr cannot keep up) a buffer is dropped and
// its lines counted, rather than slow the requests or grow without bound.
// On shutdown each worker flushes its buffer and `finish` waits until the
// writer has written every queued line.

/// A worker's buffer is handed to the writer once it holds this much.
const BUFFER_BYTES: usize = 32 * 1024;
/// Buffers waiting for the writer, at most (with `BUFFER_BYTES`, 8 MiB).
const QUEUED_BUFFERS: usize = 256;
/// How long a line may wait in a worker's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

struct Sink {
    /// `None` once finished: later lines are dropped (and counted).
    queue: Mutex<Option<SyncSender<Vec<u8>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: OnceLock<IntCounter>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

fn sink() -> &'static Sink {
    SINK.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUED_BUFFERS);
        let writer = std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || write_lines(rx))
            .ok();
        Sink {
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(writer),
            dropped: OnceLock::new(),
        }
    })
}

fn write_lines(rx: Receiver<Vec<u8>>) {
    let stderr = std::io::stderr();
    for buffer in rx {
        let mut out = stderr.lock();
        let _ = out.write_all(&buffer).and_then(|()| out.flush());
    }
}

/// Counts access log lines dropped for want of room with `counter`.
pub fn count_dropped_lines(counter: IntCounter) {
    let _ = sink().dropped.set(counter);
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(BUFFER_BYTES + 1024));
    /// The timestamp text up to the seconds, and the second it is for.
    static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

/// Appends one access log line, rendered by `fields`, to this thread's
/// buffer.
pub fn access_line(warn: bool, message: &str, fields: impl FnOnce(&mut Line<'_>)) {
    let json = FORMAT.load(Ordering::Relaxed) == LogFormat::Json as u8;
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        let mut line = Line {
            out: &mut buffer,
            json,
        };
        line.start(warn, message);
        fields(&mut line);
        line.end();
        if buffer.len() >= BUFFER_BYTES {
            hand_over(&mut buffer);
        }
    });
}

/// Hands this thread's buffered lines to the writer.
pub fn flush_access_lines() {
    BUFFER.with(|buffer| hand_over(&mut buffer.borrow_mut()));
}

fn hand_over(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    let full = std::mem::replace(buffer, Vec::with_capacity(BUFFER_BYTES + 1024));
    let sink = sink();
    let refused = match &*sink.queue.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(queue) => match queue.try_send(full) {
            Ok(()) => None,
            Err(TrySendError::Full(lines) | TrySendError::Disconnected(lines)) => Some(lines),
        },
        None => Some(full),
    };
    if let (Some(lines), Some(counter)) = (refused, sink.dropped.get()) {
        counter.inc_by(lines.iter().filter(|b| **b == b'\n').count() as u64);
    }
}

/// Flushes this worker's lines every [`FLUSH_EVERY`]; ends with the
/// worker's runtime (which must flush once more as it ends).
pub fn spawn_access_flusher() {
    tokio::spawn(async {
        let mut every = tokio::time::interval(FLUSH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            flush_access_lines();
        }
    });
}

/// Writes every line handed over so far and stops the writer: the last
/// step of a clean shutdown, once the workers have flushed.
pub fn finish_access_log() {
    flush_access_lines();
    let Some(sink) = SINK.get() else { return };
    drop(sink.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
    if let Some(writer) = sink.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = writer.join();
    }
}

/// One access log line being written: text as `tracing`'s formatter
/// writes events (`<time>  INFO tollgate::access: request key=value ...`),
/// or one JSON object, as `--log-format json` asks.
pub struct Line<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
}

impl Line<'_> {
    fn start(&mut self, warn: bool, message: &str) {
        let level = if warn { "WARN" } else { "INFO" };
        if self.json {
            self.out.extend_from_slice(b"{\"timestamp\":\"");
            put_time(self.out);
            self.out.extend_from_slice(b"\",\"level\":\"");
            self.out.extend_from_slice(level.as_bytes());
            self.out
                .extend_from_slice(b"\",\"target\":\"tollgate::access\",\"message\":\"");
            put_json_text(self.out, message);
            self.out.push(b'"');
        } else {
            put_time(self.out);
            self.out
                .extend_from_slice(if warn { b"  WARN " } else { b"  INFO " });
            self.out.extend_from_slice(b"tollgate::access: ");
            self.out.extend_from_slice(message.as_bytes());
        }
    }

    fn end(&mut self) {
        if self.json {
            self.out.push(b'}');
        }
        self.out.push(b'\n');
    }

    fn key(&mut self, key: &str) {
        if self.json {
            self.out.extend_from_slice(b",\"");
            self.out.extend_from_slice(key.as_bytes());
            self.out.extend_from_slice(b"\":");
        } else {
            self.out.push(b' ');
            self.out.extend_from_slice(key.as_bytes());
            self.out.push(b'=');
        }
    }

    pub fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        if self.json {
            self.out.push(b'"');
            put_json_text(self.out, value);
            self.out.push(b'"');
        } else {
            // Control characters would forge lines of their own.
            for b in value.bytes() {
                if b < 0x20 || b == 0x7f {
                    self.out.extend_from_slice(b"\\x");
                    self.out.extend_from_slice(&hex_byte(b));
                } else {
                    self.out.push(b);
                }
            }
        }
    }

    pub fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        put_decimal(self.out, value);
    }

    /// `micros` as milliseconds with three decimals.
    pub fn millis(&mut self, key: &str, micros: u64) {
        self.key(key);
        put_decimal(self.out, micros / 1000);
        self.out.push(b'.');
        let frac = micros % 1000;
        self.out.extend_from_slice(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    pub fn display(&mut self, key: &str, value: &dyn std::fmt::Display) {
        self.text(key, &value.to_string());
    }
}

fn hex_byte(b: u8) -> [u8; 2] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]
}

fn put_json_text(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..0x20 => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&hex_byte(b));
            }
            _ => out.push(b),
        }
    }
}

fn put_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// `n` in decimal, written into `digits` without allocating.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[i..];
        }
    }
}

/// RFC 3339 UTC time with microseconds, as `tracing`'s formatter writes it;
/// the text up to the second is rendered once per second per thread.
fn put_time(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs {
            let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let text = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            second.1.copy_from_slice(&text.as_bytes()[..20]);
            second.0 = secs;
        }
        out.extend_from_slice(&second.1);
    });
    let micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// An error and its sources, `: `-separated, for a log line or a reply.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(json: bool) -> String {
        let mut out = Vec::new();
        let mut line = Line {
            out: &mut out,
            json,
        };
        line.start(false, "request");
        line.text("path", "/a\"b\\c\n");
        line.number("status", 200);
        line.millis("latency_ms", 1234);
        line.end();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_are_text_or_json() {
        let text = render(false);
        assert!(
            text.ends_with(
                " INFO tollgate::access: request path=/a\"b\\c\\x0a status=200 latency_ms=1.234\n"
            ),
            "{text}"
        );
        assert_eq!(text.as_bytes()[4], b'-');
        let json = render(true);
        let parsed: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(parsed["path"], "/a\"b\\c\n");
        assert_eq!(parsed["status"], 200);
        assert_eq!(parsed["latency_ms"], 1.234);
        assert_eq!(parsed["target"], "tollgate::access");
        assert!(parsed["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
