//! Whether the database takes writes right now, for `/healthz` and for refusing work that
//! could not be recorded.
//!
//! A database can answer reads while writes fail (a full disk, a read-only file system, a
//! PostgreSQL tablespace out of space), and on PostgreSQL some writes may fail while others,
//! which fit in pages that exist, still commit. Each document write reports its outcome here.
//! The store is degraded while storage faults keep coming: until [`QUIET`] has passed since
//! the latest one. After that, a write that committed lately proves it writable; without one,
//! the caller writes a probe, so the state recovers by itself once space is back, without
//! waiting for a client to write.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::StoreError;

/// How long after the latest storage fault the store stays degraded.
const QUIET: Duration = Duration::from_secs(5);
/// A committed write younger than this proves the store writable without a probe.
const FRESH: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct WriteHealth {
    state: Mutex<State>,
    quiet: Duration,
}

#[derive(Debug, Default)]
struct State {
    last_fault: Option<(StoreError, Instant)>,
    last_ok: Option<Instant>,
}

/// What [`WriteHealth::check`] knows.
#[derive(Debug, PartialEq)]
pub(crate) enum Check {
    Writable,
    /// Writes failed within the quiet period; the latest fault.
    Failing(StoreError),
    /// Nothing recent either way: only a write can tell.
    Probe,
}

impl Default for WriteHealth {
    fn default() -> Self {
        WriteHealth::with_quiet_period(QUIET)
    }
}

impl WriteHealth {
    fn with_quiet_period(quiet: Duration) -> WriteHealth {
        WriteHealth {
            state: Mutex::default(),
            quiet,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the outcome of one write. Errors that say nothing about the storage (a
    /// conflict, a missing row, an etag mismatch) are not faults.
    pub(crate) fn record<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.lock().last_ok = Some(Instant::now()),
            Err(error) if error.is_storage_fault() => {
                self.lock().last_fault = Some((error.clone(), Instant::now()));
            }
            Err(_) => {}
        }
    }

    pub(crate) fn check(&self) -> Check {
        let state = self.lock();
        match &state.last_fault {
            Some((fault, at)) if at.elapsed() < self.quiet => Check::Failing(fault.clone()),
            Some((_, at)) if state.last_ok.is_none_or(|ok| ok < *at) => Check::Probe,
            _ if state.last_ok.is_some_and(|ok| ok.elapsed() < FRESH) => Check::Writable,
            _ => Check::Probe,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: Result<(), StoreError> = Ok(());

    #[test]
    fn faults_degrade_until_a_quiet_period_passes() {
        let health = WriteHealth::with_quiet_period(Duration::from_millis(200));
        assert_eq!(health.check(), Check::Probe, "nothing written yet");
        health.record(&DONE);
        assert_eq!(health.check(), Check::Writable);

        health.record(&Err::<(), _>(StoreError::Conflict));
        assert_eq!(health.check(), Check::Writable, "a conflict is not a fault");

        let full = StoreError::Full("database or disk is full".into());
        health.record(&Err::<(), _>(full.clone()));
        health.record(&DONE);
        assert_eq!(
            health.check(),
            Check::Failing(full),
            "one write that fits does not end it"
        );

        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            health.check(),
            Check::Writable,
            "quiet, and a write committed since the fault"
        );

        health.record(&Err::<(), _>(StoreError::Unavailable(
            "disk I/O error".into(),
        )));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            health.check(),
            Check::Probe,
            "quiet, but nothing committed since"
        );
        health.record(&DONE);
        assert_eq!(health.check(), Check::Writable);
    }
}
