//! Structured logs (tracing). Every line of a request carries its `request_id` (see `http`).
//!
//! Lines leave request handling through a bounded queue drained by one writer thread
//! (tracing-appender's non-blocking writer). A log that cannot keep up or cannot be written (a
//! full disk, a pipe nobody reads) loses lines, counted in
//! `zerotouch_log_lines_dropped_total`, and never blocks, slows or fails a request: a
//! synchronous write to stderr used to block every worker on a stalled pipe, and tracing's
//! report of a failed write panicked the worker thread on a full disk.
//!
//! **Invariant:** nothing a client sends can forge a log line. The text format writes every
//! field and message through [`write_field`], which escapes control characters (a client id
//! with `\n` used to start a line of its own) and cuts long values (a 10,000-character id
//! used to be copied whole into three lines). The JSON format escapes through serde.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::Field;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::format::{self, Writer};

use crate::config::{Log, LogFormat};

/// Lines waiting for the writer thread before new ones are dropped (a few MB at most).
const QUEUED_LINES: usize = 16_384;
/// Longest field value in the text log, in characters; longer ones are cut with a marker.
const FIELD_CHARS: usize = 256;
/// Longest message in the text log, in characters.
const MESSAGE_CHARS: usize = 1024;

/// Lines the writer thread could not write.
static FAILED_WRITES: AtomicU64 = AtomicU64::new(0);
/// Lines dropped because the queue was full, counted by the non-blocking writer.
static QUEUE_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the writer thread; dropping it flushes what is queued (waiting at most about a second).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber once; later calls are no-ops (tests start many servers).
pub fn init(log: &Log) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(Sink(io::stderr()));
    let queue_drops = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    let installed = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder
            .fmt_fields(format::debug_fn(write_field).delimited(" "))
            .try_init(),
    };
    match installed {
        Ok(()) => {
            let _ = QUEUE_DROPS.set(queue_drops);
            LogGuard {
                _worker: Some(guard),
            }
        }
        Err(_) => LogGuard { _worker: None },
    }
}

/// Writes one field of the text log (`name=value`, or the bare message) with control
/// characters escaped and the value cut to its limit.
fn write_field(writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    let name = field.name();
    // Metadata of events that came from the `log` crate, shown in the line's prefix already.
    if name.starts_with("log.") {
        return Ok(());
    }
    let mut rendered = String::new();
    write!(rendered, "{value:?}")?;
    if name == "message" {
        write!(writer, "{}", sanitize(&rendered, MESSAGE_CHARS))
    } else {
        let name = name.strip_prefix("r#").unwrap_or(name);
        write!(writer, "{name}={}", sanitize(&rendered, FIELD_CHARS))
    }
}

/// `text` with every character that could end a line or steer a terminal escaped (C0 and C1
/// controls, DEL, Unicode line and paragraph separators, bidirectional overrides), cut after
/// `limit` characters with a note of what was left out.
fn sanitize(text: &str, limit: usize) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    let cut = text.char_indices().nth(limit).map(|(at, _)| at);
    if cut.is_none() && !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let kept = &text[..cut.unwrap_or(text.len())];
    let mut out = String::with_capacity(kept.len() + 32);
    for c in kept.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    if let Some(at) = cut {
        let _ = write!(out, "…[{} more bytes]", text.len() - at);
    }
    Cow::Owned(out)
}

/// Log lines lost so far: queued beyond the limit, or not writable.
pub fn dropped_lines() -> u64 {
    let queued = QUEUE_DROPS
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64);
    FAILED_WRITES.load(Ordering::Relaxed).saturating_add(queued)
}

/// The writer thread's end: a line that cannot be written is counted and dropped, so the
/// thread goes on with the next one.
struct Sink<W>(W);

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.0.write_all(line).is_err() {
            FAILED_WRITES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// For an error answered outside an HTTP request (an MQTT response topic): a fresh tracking id
/// to send, under which the internal detail, if any, is logged. Over HTTPS `http::observe` does
/// the same with the request id.
pub fn track_for_client(internal: Option<&str>, what: &str) -> String {
    let tracking_id = uuid::Uuid::new_v4().to_string();
    if let Some(detail) = internal {
        tracing::error!(tracking_id, detail, "{what} failed on our side");
    }
    tracking_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_cannot_start_a_line_or_flood_it() {
        assert_eq!(sanitize("dev-1", 256), "dev-1");
        assert_eq!(
            sanitize("evil\n2026-12-06T00:00:00Z  INFO forged\r\t\u{1b}[31m", 256),
            "evil\\n2026-12-06T00:00:00Z  INFO forged\\r\\t\\u{1b}[31m"
        );
        assert_eq!(
            sanitize("a\u{85}b\u{2028}c\u{202e}d", 256),
            "a\\u{85}b\\u{2028}c\\u{202e}d"
        );
        let long = "x".repeat(10_000);
        let cut = sanitize(&long, 256);
        assert!(cut.starts_with(&"x".repeat(256)));
        assert!(cut.ends_with("…[9744 more bytes]"), "{cut}");
        assert_eq!(sanitize("ééé", 2), "éé…[2 more bytes]");
    }

    #[test]
    fn a_failing_sink_counts_and_swallows() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::from_raw_os_error(28))
            }
        }
        let before = FAILED_WRITES.load(Ordering::Relaxed);
        let mut sink = Sink(Full);
        assert_eq!(sink.write(b"line\n").unwrap(), 5);
        assert!(sink.flush().is_ok());
        assert_eq!(FAILED_WRITES.load(Ordering::Relaxed), before + 1);
    }
}
