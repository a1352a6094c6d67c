//! Overload: registrations beyond `dps.max_concurrent_registrations` get 429 with a
//! `retry-after` (the SDKs retry), never a timeout; and registrations are counted in /metrics.

use reqwest::Method;
use serde_json::json;
use zerotouch_attestation::symmetric_key;
use zerotouch_tests::{Backend, TestServer, send};

fn register(
    s: &TestServer,
    id: &str,
    key: &str,
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let resource = format!("{}/registrations/{id}", s.id_scope);
    let token = symmetric_key::sign(
        &resource,
        key,
        zerotouch_service::time::now_unix() + 600,
        None,
    )
    .unwrap();
    send(
        s.client
            .put(s.url(&format!("/{}/registrations/{id}/register", s.id_scope)))
            .header("Authorization", token)
            .json(&json!({"registrationId": id})),
    )
}

fn enroll(s: &TestServer, id: &str) -> String {
    let (status, body, _) = send(
        s.request(Method::PUT, &format!("/enrollments/{id}"))
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{body}");
    body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

fn metrics(s: &TestServer) -> String {
    s.client
        .get(format!("https://localhost:{}/metrics", s.https_port()))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn full_service_answers_429_with_retry_after() {
    let s = TestServer::start_with(Backend::Sqlite, |settings| {
        settings.dps.max_concurrent_registrations = 0
    });
    let key = enroll(&s, "busy-dev");
    let (status, body, headers) = register(&s, "busy-dev", &key);
    assert_eq!(
        (status, body["errorCode"].as_u64()),
        (429, Some(429_001)),
        "{body}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert!(metrics(&s).contains(
        "zerotouch_dps_registrations_total{attestation=\"symmetricKey\",outcome=\"throttled\"} 1"
    ));
}

#[test]
fn registrations_are_counted_by_outcome() {
    let s = TestServer::start(Backend::Sqlite);
    let key = enroll(&s, "counted");
    let (status, body, _) = register(&s, "counted", &key);
    assert_eq!(status, 202, "{body}");
    let (status, _, _) = register(&s, "counted", &symmetric_key::generate_key().unwrap());
    assert_eq!(status, 401);
    let text = metrics(&s);
    assert!(
        text.contains(
            "zerotouch_dps_registrations_total{attestation=\"symmetricKey\",outcome=\"assigned\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "zerotouch_dps_registrations_total{attestation=\"symmetricKey\",outcome=\"refused\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("zerotouch_dps_registration_duration_seconds_bucket"));
}
