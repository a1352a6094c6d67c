//! Storage faults, on SQLite and PostgreSQL: a full disk never loses a write that was
//! confirmed, every refused write is a 503 with a stable code and `Retry-After` (never a 500),
//! `/healthz` says the store is degraded and recovers by itself, and registrations are refused
//! with a retry hint instead of being accepted and then lost. (A log that cannot be written is
//! in `logs.rs`.)
//!
//! The disk is a small tmpfs the test fills (`zerotouch_tests::disk`): SQLite keeps its data
//! dir there, PostgreSQL a tablespace. Mounting needs root, which CI has.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_tests::disk::{PostgresOnSmallDisk, SmallDisk};
use zerotouch_tests::{Backend, TestServer, backends, send};

/// The disk a server's storage lives on, kept alive (and mounted) as long as the server.
enum Storage {
    Sqlite(SmallDisk),
    Postgres(PostgresOnSmallDisk),
}

impl Storage {
    fn disk(&self) -> &SmallDisk {
        match self {
            Storage::Sqlite(disk) => disk,
            Storage::Postgres(pg) => &pg.disk,
        }
    }
}

/// A server whose database is on a small disk of its own.
fn server_on_small_disk(backend: Backend) -> (Storage, TestServer) {
    let storage = match backend {
        Backend::Sqlite => Storage::Sqlite(SmallDisk::mount(16, None).expect("tmpfs")),
        Backend::Postgres => Storage::Postgres(PostgresOnSmallDisk::create(16).expect("tmpfs")),
    };
    let server = TestServer::start_with(backend, |settings| match &storage {
        Storage::Sqlite(disk) => settings.service.data_dir = disk.path().join("data"),
        Storage::Postgres(pg) => settings.database.url = Some(pg.url.clone()),
    });
    (storage, server)
}

/// A 503 with `Retry-After`; returns the body.
fn assert_retry_later(status: u16, body: &Value, headers: &reqwest::header::HeaderMap, what: &str) {
    assert_eq!(status, 503, "{what}: {body}");
    let retry = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    assert!(
        retry.is_some_and(|seconds| seconds >= 1),
        "{what}: no Retry-After: {headers:?}"
    );
}

fn healthz(s: &TestServer) -> (u16, Value) {
    let (status, body, _) = send(
        s.client
            .get(format!("https://localhost:{}/healthz", s.https_port())),
    );
    (status, body)
}

fn register(s: &TestServer, id: &str, key: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let sas = s.device_sas(id, key, 3600);
    send(
        s.dps_request(
            &s.client,
            Method::PUT,
            &format!("/{}/registrations/{id}/register", s.id_scope),
            Some(&sas),
        )
        .json(&json!({ "registrationId": id })),
    )
}

#[test]
fn a_full_disk_refuses_writes_with_503_and_loses_none_it_confirmed() {
    for backend in backends() {
        eprintln!("--- {backend:?}");
        let (storage, mut s) = server_on_small_disk(backend);
        let key = s.enroll_symmetric("late-device");
        let (status, body, _) = send(
            s.hub_request(Method::PUT, "/devices/before-the-fault")
                .json(&json!({"deviceId": "before-the-fault"})),
        );
        assert_eq!(status, 200, "{body}");

        storage.disk().fill().expect("fill the disk");

        // Write until the storage refuses for a while; every answer is a 200 or a 503.
        let mut confirmed_devices = Vec::new();
        let mut confirmed_enrollments = Vec::new();
        let mut refused = 0;
        for i in 0..600 {
            let id = format!("dev-{i}");
            let (status, body, headers) = send(
                s.hub_request(Method::PUT, &format!("/devices/{id}"))
                    .json(&json!({ "deviceId": id })),
            );
            match status {
                200 => confirmed_devices.push(id),
                _ => {
                    assert_retry_later(status, &body, &headers, &format!("PUT /devices/{id}"));
                    assert_eq!(
                        headers
                            .get("iothub-errorcode")
                            .and_then(|v| v.to_str().ok()),
                        Some("ServiceUnavailable")
                    );
                    refused += 1;
                }
            }
            if i % 4 == 0 {
                let id = format!("enr-{i}");
                let (status, body, headers) = send(
                    s.request(Method::PUT, &format!("/enrollments/{id}"))
                        .json(&json!({"attestation": {"type": "symmetricKey"}})),
                );
                match status {
                    200 => confirmed_enrollments.push(id),
                    _ => {
                        assert_retry_later(
                            status,
                            &body,
                            &headers,
                            &format!("PUT enrollment {id}"),
                        );
                        assert_eq!(body["errorCode"], 503_002, "{body}");
                        refused += 1;
                    }
                }
            }
            if refused >= 40 {
                break;
            }
        }
        assert!(
            refused > 0,
            "{backend:?}: filling the disk made no write fail ({} confirmed)",
            confirmed_devices.len()
        );
        eprintln!(
            "{backend:?}: {} devices and {} enrollments confirmed, {refused} writes refused",
            confirmed_devices.len(),
            confirmed_enrollments.len()
        );

        // A twin update and a registration during the fault: a retry hint, never a 500 and
        // never a 202 for an operation that cannot be recorded.
        let (status, body, headers) = send(
            s.hub_request(Method::PATCH, "/twins/before-the-fault")
                .header("If-Match", "*")
                .json(&json!({"tags": {"site": "x".repeat(2000)}})),
        );
        if status != 200 {
            assert_retry_later(status, &body, &headers, "twin PATCH");
        }
        let (status, body, headers) = register(&s, "late-device", &key);
        assert_retry_later(status, &body, &headers, "registration during the fault");
        assert_eq!(body["errorCode"], 503_002, "{body}");

        let (status, body) = healthz(&s);
        assert_eq!(
            (status, &body["status"]),
            (503, &json!("degraded")),
            "{body}"
        );
        assert_eq!(body["store"], "full", "{body}");
        assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));

        // Space comes back: the store recovers by itself, without a restart.
        storage.disk().free().expect("free the disk");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = healthz(&s);
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "never recovered: {body}");
            std::thread::sleep(Duration::from_millis(250));
        }
        let (status, body, _) = register(&s, "late-device", &key);
        assert!(matches!(status, 200 | 202), "{status} {body}");

        // Everything confirmed is there, after a restart too.
        s.restart();
        for id in &confirmed_devices {
            let (status, body, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
            assert_eq!(
                status, 200,
                "{backend:?}: device {id} was confirmed, then lost: {body}"
            );
        }
        for id in &confirmed_enrollments {
            let (status, body, _) = send(s.request(Method::GET, &format!("/enrollments/{id}")));
            assert_eq!(
                status, 200,
                "{backend:?}: enrollment {id} was confirmed, then lost: {body}"
            );
        }
        drop(s);
        drop(storage);
    }
}
