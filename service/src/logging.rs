//! Structured logs (tracing). Every line of a request carries its `request_id` (see `http`).
//!
//! Lines leave request handling through a bounded queue drained by one writer thread
//! (tracing-appender's non-blocking writer). A log that cannot keep up or cannot be written (a
//! full disk, a pipe nobody reads) loses lines, counted in
//! `zerotouch_log_lines_dropped_total`, and never blocks, slows or fails a request: a
//! synchronous write to stderr used to block every worker on a stalled pipe, and tracing's
//! report of a failed write panicked the worker thread on a full disk.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Lines waiting for the writer thread before new ones are dropped (a few MB at most).
const QUEUED_LINES: usize = 16_384;

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
        LogFormat::Text => builder.try_init(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
