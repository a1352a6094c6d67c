//! The last hour of registrations and telemetry per second, for the console's live charts.
//!
//! Every [`INTERVAL`] the sampler reads this process's counters (the same ones `/metrics`
//! shows) and keeps the last [`KEEP`] readings in memory; a chart is the differences of
//! consecutive readings. The figures are this process's own: in replica mode each replica
//! charts what it handled, like its `/metrics`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// How often the counters are read.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Readings kept: one hour.
pub const KEEP: usize = 360;

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub registrations: u64,
    pub failed_registrations: u64,
    pub telemetry: u64,
}

/// One point of the charts: rates over the interval that ends at `at`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Unix milliseconds.
    pub at: u64,
    pub registrations_per_second: f64,
    pub failed_registrations_per_second: f64,
    pub telemetry_per_second: f64,
}

#[derive(Default)]
pub struct Rates {
    readings: Mutex<VecDeque<Reading>>,
}

impl Rates {
    pub fn record(&self, reading: Reading) {
        let Ok(mut readings) = self.readings.lock() else {
            return;
        };
        // A counter that went down means the process restarted its counters: start over.
        if readings.back().is_some_and(|last| {
            reading.registrations < last.registrations || reading.telemetry < last.telemetry
        }) {
            readings.clear();
        }
        readings.push_back(reading);
        while readings.len() > KEEP + 1 {
            readings.pop_front();
        }
    }

    /// Rates between consecutive readings, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let Ok(readings) = self.readings.lock() else {
            return Vec::new();
        };
        readings
            .iter()
            .zip(readings.iter().skip(1))
            .filter(|(a, b)| b.at_ms > a.at_ms)
            .map(|(a, b)| {
                let seconds = (b.at_ms - a.at_ms) as f64 / 1000.0;
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / seconds;
                Point {
                    at: b.at_ms,
                    registrations_per_second: rate(a.registrations, b.registrations),
                    failed_registrations_per_second: rate(
                        a.failed_registrations,
                        b.failed_registrations,
                    ),
                    telemetry_per_second: rate(a.telemetry, b.telemetry),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at_s: u64, registrations: u64, telemetry: u64) -> Reading {
        Reading {
            at_ms: at_s * 1000,
            registrations,
            failed_registrations: registrations / 2,
            telemetry,
        }
    }

    #[test]
    fn points_are_rates_between_readings() {
        let rates = Rates::default();
        assert!(rates.points().is_empty());
        rates.record(reading(0, 0, 0));
        rates.record(reading(10, 20, 1000));
        rates.record(reading(20, 20, 1500));
        let points = rates.points();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].at, 10_000);
        assert_eq!(points[0].registrations_per_second, 2.0);
        assert_eq!(points[0].failed_registrations_per_second, 1.0);
        assert_eq!(points[0].telemetry_per_second, 100.0);
        assert_eq!(points[1].registrations_per_second, 0.0);
        assert_eq!(points[1].telemetry_per_second, 50.0);
    }

    #[test]
    fn an_hour_is_kept_and_a_counter_reset_starts_over() {
        let rates = Rates::default();
        for i in 0..(KEEP as u64 + 50) {
            rates.record(reading(i * 10, i, i * 3));
        }
        assert_eq!(rates.points().len(), KEEP);
        rates.record(reading(100_000, 0, 0));
        assert!(rates.points().is_empty());
    }
}
