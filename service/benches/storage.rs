//! Micro-benchmark of the storage write path: `DocumentStore::put` with `Write::Upsert` of a
//! 1 KiB JSON document into SQLite (a temporary file, WAL, the service's own migrations and
//! pool).
//!
//! Run with `cargo bench -p zerotouch-service --bench storage` (see docs/performance.md).
//! The MQTT codec (`service/src/mqtt/codec.rs`) has no benchmark here: it is crate-private
//! (`pub(crate)` items, a test-only `client` helper), not a stable API to expose for a bench.

// Setup failures should abort the run with a message, as in a test.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use zerotouch_service::db::{self, Collection, DocumentStore, Write};

/// A registration-state-like document whose JSON text is about 1 KiB.
fn document() -> Value {
    let mut body = json!({
        "registrationId": "bench-device-0001",
        "createdDateTimeUtc": "2026-11-29T07:00:00.0000000Z",
        "assignedHub": "hub.example.com",
        "deviceId": "bench-device-0001",
        "status": "assigned",
        "substatus": "initialAssignment",
        "lastUpdatedDateTimeUtc": "2026-11-29T07:00:00.0000000Z",
        "etag": "\"00000000-0000-0000-0000-000000000000\"",
        "payload": {}
    });
    let text_len = serde_json::to_string(&body).expect("json").len();
    body["payload"] = json!({ "pad": "x".repeat(1024 - text_len - 12) });
    body
}

fn put(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = db::open(&url).expect("open SQLite");
    let body = document();
    let size = serde_json::to_string(&body).expect("json").len();
    assert!((1000..=1100).contains(&size), "document is {size} bytes");

    // The same id over and over: the update path of an upsert.
    c.bench_function("storage/sqlite_upsert_1k_same_id", |b| {
        b.iter(|| {
            store
                .put(
                    Collection::Registrations,
                    "bench-device-0001",
                    None,
                    black_box(&body),
                    Write::Upsert,
                )
                .expect("put")
        })
    });

    // A new id every time: the insert path (the table grows during the run).
    let mut n: u64 = 0;
    c.bench_function("storage/sqlite_upsert_1k_new_id", |b| {
        b.iter(|| {
            n += 1;
            store
                .put(
                    Collection::Registrations,
                    &format!("bench-device-{n:08}"),
                    None,
                    black_box(&body),
                    Write::Upsert,
                )
                .expect("put")
        })
    });
    drop(store);
    drop(dir);
}

criterion_group!(benches, put);
criterion_main!(benches);
