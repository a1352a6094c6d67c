//! Micro-benchmarks of the twin document: a device's reported-properties patch and a query
//! WHERE clause evaluated over one twin.
//!
//! Run with `cargo bench -p zerotouch-twin` (see docs/performance.md). The twin is built once
//! with tags, desired properties and about 40 reported properties (roughly 3 KiB stored), like
//! a telemetry device that reports its state.

// Setup failures should abort the run with a message, as in a test.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use zerotouch_twin::document::Twin;
use zerotouch_twin::query::Query;

const T0: &str = "2026-11-29T07:00:00.0000000Z";
const T1: &str = "2026-11-29T07:00:05.0000000Z";

fn realistic_twin() -> Twin {
    let initial = json!({
        "tags": {
            "location": {"region": "eu-west", "site": "plant-7", "line": 3},
            "owner": "ops",
            "tier": "gold"
        },
        "properties": {"desired": {
            "telemetryInterval": 30,
            "firmware": {"version": "2.4.1", "channel": "stable"},
            "thresholds": {"temperature": 75.5, "humidity": 60, "vibration": 0.8}
        }}
    });
    let mut twin = Twin::new(Some(&initial), T0).expect("twin");
    let mut sensors = serde_json::Map::new();
    for i in 0..24 {
        sensors.insert(
            format!("sensor{i:02}"),
            json!({"value": 20.0 + f64::from(i) / 10.0, "unit": "C", "ok": true}),
        );
    }
    let initial_report = json!({
        "firmware": {"version": "2.4.1", "installedAt": T0, "bootCount": 17},
        "connectivity": {"type": "cellular", "rssi": -71, "operator": "Contoso Mobile"},
        "battery": {"level": 88, "charging": false},
        "sensors": Value::Object(sensors),
        "uptimeSecs": 86_400,
        "lastError": null
    });
    twin.patch_reported(&initial_report, T0)
        .expect("initial report");
    twin
}

/// What a device typically reports every few seconds: a handful of changed values.
fn small_patch() -> Value {
    json!({
        "battery": {"level": 87},
        "connectivity": {"rssi": -69},
        "sensors": {"sensor03": {"value": 21.7}, "sensor11": {"value": 19.9}},
        "uptimeSecs": 86_405
    })
}

fn patch(c: &mut Criterion) {
    let patch = small_patch();
    let mut twin = realistic_twin();
    c.bench_function("twin/patch_reported", |b| {
        b.iter(|| twin.patch_reported(black_box(&patch), T1))
    });

    // The hub's full CPU path for one patch: load the stored JSON, patch, store it again.
    let stored = realistic_twin().to_value();
    c.bench_function("twin/patch_reported_stored_roundtrip", |b| {
        b.iter(|| {
            let mut twin = Twin::from_value(black_box(&stored)).expect("stored twin");
            twin.patch_reported(black_box(&patch), T1).expect("patch");
            twin.to_value()
        })
    });

    // Same patch on a fresh copy each time (the clone is outside the timing).
    let base = realistic_twin();
    c.bench_function("twin/patch_reported_fresh", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |twin| twin.patch_reported(black_box(&patch), T1),
            BatchSize::SmallInput,
        )
    });
}

fn query(c: &mut Criterion) {
    let mut view = realistic_twin().service_view();
    if let Value::Object(fields) = &mut view {
        fields.insert("deviceId".into(), "bench-device-0001".into());
        fields.insert("status".into(), "enabled".into());
    }
    let query = Query::parse(
        "SELECT * FROM devices WHERE tags.location.region = 'eu-west' \
         AND properties.reported.battery.level > 20 \
         AND properties.reported.firmware.version != properties.desired.firmware.version \
         OR STARTSWITH(deviceId, 'bench-')",
    )
    .expect("query");
    assert!(query.matches(&view));
    c.bench_function("twin/query_matches", |b| {
        b.iter(|| query.matches(black_box(&view)))
    });
}

criterion_group!(benches, patch, query);
criterion_main!(benches);
