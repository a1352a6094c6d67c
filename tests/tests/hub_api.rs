//! The hub's service API through HTTPS: registry rules, twins, query paging, methods to
//! offline devices, C2D queue limits, roles and metrics. The full device flows are proven with
//! the real Azure SDKs in tests/python/test_hub_sdk.py.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_service::config::Role;
use zerotouch_tests::{Backend, TestServer, backends, send};

fn hub_code(body: &Value) -> u64 {
    body["errorCode"]
        .as_u64()
        .unwrap_or_else(|| panic!("no errorCode in {body}"))
}

fn create(s: &TestServer, id: &str) -> Value {
    let (status, body, _) = send(
        s.hub_request(Method::PUT, &format!("/devices/{id}"))
            .json(&json!({"deviceId": id})),
    );
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn registry_rules() {
    for backend in backends() {
        let s = TestServer::start(backend);
        let device = create(&s, "Dev-1");
        assert_eq!(device["authentication"]["type"], "sas");
        assert_eq!(device["connectionState"], "Disconnected");
        // Ids are case-sensitive: dev-1 is another device.
        create(&s, "dev-1");
        let (status, err, headers) = send(
            s.hub_request(Method::PUT, "/devices/Dev-1")
                .json(&json!({})),
        );
        assert_eq!((status, hub_code(&err)), (409, 409_001), "{err}");
        assert_eq!(headers["iothub-errorcode"], "DeviceAlreadyExists");
        assert!(
            err["Message"]
                .as_str()
                .unwrap()
                .starts_with("ErrorCode:DeviceAlreadyExists;")
        );
        // Update with a stale etag; with the right one keys are kept and status changes.
        let (status, _, _) = send(
            s.hub_request(Method::PUT, "/devices/Dev-1")
                .header("If-Match", "\"nope\"")
                .json(&json!({"status": "disabled"})),
        );
        assert_eq!(status, 412);
        let etag = device["etag"].as_str().unwrap();
        let (status, updated, _) = send(
            s.hub_request(Method::PUT, "/devices/Dev-1")
                .header("If-Match", format!("\"{etag}\""))
                .json(&json!({"status": "disabled"})),
        );
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["status"], "disabled");
        assert_eq!(
            updated["authentication"]["symmetricKey"],
            device["authentication"]["symmetricKey"]
        );
        // If-Match on a missing device is 404; bad input is 400 with Azure's code.
        let (status, err, _) = send(
            s.hub_request(Method::PUT, "/devices/ghost")
                .header("If-Match", "\"*\"")
                .json(&json!({})),
        );
        assert_eq!((status, hub_code(&err)), (404, 404_001));
        let (status, err, _) = send(
            s.hub_request(Method::PUT, "/devices/a%20b")
                .json(&json!({})),
        );
        assert_eq!((status, hub_code(&err)), (400, 400_004));
        let (status, stats, _) = send(s.hub_request(Method::GET, "/statistics/devices"));
        assert_eq!(status, 200);
        assert_eq!(
            stats,
            json!({"totalDeviceCount": 2, "enabledDeviceCount": 1, "disabledDeviceCount": 1})
        );
        let (status, _, _) = send(
            s.hub_request(Method::DELETE, "/devices/Dev-1")
                .header("If-Match", "\"*\""),
        );
        assert_eq!(status, 204);
        let (status, err, _) = send(s.hub_request(Method::GET, "/twins/Dev-1"));
        assert_eq!((status, hub_code(&err)), (404, 404_001));
    }
}

#[test]
fn twins_and_query_with_paging() {
    for backend in backends() {
        let s = TestServer::start(backend);
        for i in 0..7 {
            let id = format!("d{i}");
            create(&s, &id);
            let site = if i % 2 == 0 { "even" } else { "odd" };
            let (status, twin, _) = send(
                s.hub_request(Method::PATCH, &format!("/twins/{id}"))
                    .json(&json!({"tags": {"site": site, "n": i}, "properties": {"desired": {"rate": i}}})),
            );
            assert_eq!(status, 200, "{twin}");
            assert_eq!(twin["properties"]["desired"]["$version"], 2);
            assert_eq!(twin["tags"]["n"], i);
        }
        // Paging: 4 even devices, 2 per page.
        let mut seen = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut request = s
                .hub_request(Method::POST, "/devices/query")
                .header("x-ms-max-item-count", "2")
                .json(&json!({"query": "SELECT * FROM devices WHERE tags.site = 'even'"}));
            if let Some(token) = &continuation {
                request = request.header("x-ms-continuation", token);
            }
            let (status, page, headers) = send(request);
            assert_eq!(status, 200, "{page}");
            assert_eq!(headers["x-ms-item-type"], "twin");
            assert!(page.as_array().unwrap().len() <= 2);
            seen.extend(
                page.as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["deviceId"].as_str().unwrap().to_string()),
            );
            continuation = headers
                .get("x-ms-continuation")
                .map(|v| v.to_str().unwrap().to_string());
            if continuation.is_none() {
                break;
            }
        }
        assert_eq!(seen, vec!["d0", "d2", "d4", "d6"]);
        // TOP, projections and aggregates.
        let (_, top, _) = send(
            s.hub_request(Method::POST, "/devices/query")
                .json(&json!({"query": "SELECT TOP 3 * FROM devices"})),
        );
        assert_eq!(top.as_array().unwrap().len(), 3);
        let (_, rows, headers) = send(s.hub_request(Method::POST, "/devices/query").json(&json!({
            "query": "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site"
        })));
        assert_eq!(headers["x-ms-item-type"], "raw");
        assert_eq!(
            rows,
            json!([{"site": "even", "n": 4}, {"site": "odd", "n": 3}])
        );
        let (status, err, _) = send(
            s.hub_request(Method::POST, "/devices/query")
                .json(&json!({"query": "SELECT * FROM devices WHERE STARTS_WITH(deviceId, 'd')"})),
        );
        assert_eq!((status, hub_code(&err)), (400, 400_004), "{err}");
        // Twin limits: an oversize desired patch is a 400 and changes nothing.
        let big: serde_json::Map<String, Value> = (0..12)
            .map(|i| (format!("k{i}"), json!("x".repeat(3000))))
            .collect();
        let (status, err, _) = send(
            s.hub_request(Method::PATCH, "/twins/d0")
                .json(&json!({"properties": {"desired": big}})),
        );
        assert_eq!((status, hub_code(&err)), (400, 400_004), "{err}");
        let (_, twin, _) = send(s.hub_request(Method::GET, "/twins/d0"));
        assert_eq!(twin["properties"]["desired"]["$version"], 2);
        // Twin If-Match.
        let (status, _, _) = send(
            s.hub_request(Method::PATCH, "/twins/d0")
                .header("If-Match", "\"AAAAAAAAAAA=\"")
                .json(&json!({"tags": {"x": 1}})),
        );
        assert_eq!(status, 412);
        let etag = twin["etag"].as_str().unwrap();
        let (status, replaced, _) = send(
            s.hub_request(Method::PUT, "/twins/d0")
                .header("If-Match", format!("\"{etag}\""))
                .json(&json!({"tags": {"only": true}})),
        );
        assert_eq!(status, 200);
        assert_eq!(replaced["tags"], json!({"only": true}));
    }
}

#[test]
fn methods_and_c2d_for_offline_devices() {
    let s = TestServer::start(Backend::Sqlite);
    create(&s, "sleepy");
    let (status, err, _) = send(
        s.hub_request(Method::POST, "/twins/sleepy/methods")
            .json(&json!({"methodName": "reboot", "responseTimeoutInSeconds": 5})),
    );
    assert_eq!((status, hub_code(&err)), (404, 404_103), "{err}");
    let (status, err, _) = send(
        s.hub_request(Method::POST, "/twins/sleepy/methods")
            .json(&json!({"methodName": "bad name", "responseTimeoutInSeconds": 5})),
    );
    assert_eq!((status, hub_code(&err)), (400, 400_004));
    // C2D waits for the device, up to 50 messages.
    for i in 0..50 {
        let (status, err, _) = send(
            s.hub_request(Method::POST, "/devices/sleepy/messages/deviceBound")
                .body(format!("m{i}")),
        );
        assert_eq!(status, 204, "{err}");
    }
    let (status, err, _) = send(
        s.hub_request(Method::POST, "/devices/sleepy/messages/deviceBound")
            .body("one too many"),
    );
    assert_eq!((status, hub_code(&err)), (403, 403_004));
    let (_, device, _) = send(s.hub_request(Method::GET, "/devices/sleepy"));
    assert_eq!(device["cloudToDeviceMessageCount"], 50);
    // Deleting the device drops its queue.
    let (status, _, _) = send(s.hub_request(Method::DELETE, "/devices/sleepy"));
    assert_eq!(status, 204);
    create(&s, "sleepy");
    let (_, device, _) = send(s.hub_request(Method::GET, "/devices/sleepy"));
    assert_eq!(device["cloudToDeviceMessageCount"], 0);
}

#[test]
fn device_telemetry_over_https_and_the_consumer() {
    let s = TestServer::start(Backend::Sqlite);
    let device = create(&s, "http-dev");
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    let now = zerotouch_service::time::now_unix();
    let token = zerotouch_attestation::symmetric_key::sign(
        &format!("{}/devices/http-dev", s.host()),
        key,
        now + 600,
        None,
    )
    .unwrap();
    let (status, body, _) = send(
        s.client
            .post(s.url("/devices/http-dev/messages/events"))
            .header("Authorization", &token)
            .header("iothub-messageid", "h-1")
            .header("iothub-app-color", "blue")
            .header("content-type", "application/json")
            .body("{\"x\":1}"),
    );
    assert_eq!(status, 204, "{body}");
    // Another device's token is refused and stores nothing.
    let other = zerotouch_attestation::symmetric_key::sign(
        &format!("{}/devices/other", s.host()),
        key,
        now + 600,
        None,
    )
    .unwrap();
    let (status, _, _) = send(
        s.client
            .post(s.url("/devices/http-dev/messages/events"))
            .header("Authorization", other)
            .body("no"),
    );
    assert_eq!(status, 401);
    let (status, page, _) = send(s.hub_request(
        Method::GET,
        "/messages/events?from=0&limit=10&deviceId=http-dev",
    ));
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["systemProperties"]["message-id"], "h-1");
    assert_eq!(messages[0]["properties"], json!({"color": "blue"}));
    let next = page["nextOffset"].as_i64().unwrap();
    // Long-poll: nothing new within 1 s.
    let started = std::time::Instant::now();
    let (_, empty, _) =
        send(s.hub_request(Method::GET, &format!("/messages/events?from={next}&wait=1")));
    assert_eq!(empty["messages"], json!([]));
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    let (_, metrics, _) = send(
        s.client
            .get(format!("https://localhost:{}/metrics", s.https_port())),
    );
    let text = metrics.as_str().unwrap().to_string();
    assert!(text.contains("zerotouch_hub_messages_in_total 1"), "{text}");
    assert!(
        text.contains("zerotouch_hub_auth_failures_total{reason=\"wrong_scope\"} 1"),
        "{text}"
    );
}

#[test]
fn roles_choose_what_runs() {
    let hub_only = TestServer::start_with(Backend::Sqlite, |s| s.service.role = Role::Hub);
    let (status, _, _) = send(hub_only.request(Method::GET, "/enrollments/x"));
    assert_eq!(status, 404);
    create(&hub_only, "h1");
    let dps_only = TestServer::start_with(Backend::Sqlite, |s| s.service.role = Role::Dps);
    let (status, err, _) = send(dps_only.request(Method::GET, "/enrollments/x"));
    assert_eq!((status, err["errorCode"].as_u64()), (404, Some(404_201)));
    let (status, _, _) = send(dps_only.hub_request(Method::GET, "/devices/h1"));
    assert_eq!(status, 404);
}

/// A device SAS token for the hub (`{host}/devices/{id}`), from the device's primary key.
fn device_token(s: &TestServer, device: &Value) -> String {
    let id = device["deviceId"].as_str().expect("deviceId");
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("key");
    zerotouch_attestation::symmetric_key::sign(
        &format!("{}/devices/{id}", s.host()),
        key,
        zerotouch_service::time::now_unix() + 600,
        None,
    )
    .expect("sign")
}

/// Batches as the SDKs send them (hub-protocol §6): the Node and C SDKs send base64 bodies
/// without `base64Encoded`, Java sends `"base64Encoded": true`; only `false` means text.
#[test]
fn telemetry_batches_as_the_sdks_send_them() {
    for backend in backends() {
        let s = TestServer::start(backend);
        let device = create(&s, "batcher");
        let token = device_token(&s, &device);
        let batch = |body: String| {
            send(
                s.client
                    .post(s.url("/devices/batcher/messages/events"))
                    .header("Authorization", &token)
                    .header("Content-Type", "application/vnd.microsoft.iothub.json")
                    .body(body),
            )
        };
        // Byte for byte what azure-iot-device-http 1.14 builds (`constructBatchBody`).
        let node = format!(
            "[{{\"body\": \"{}\", \"properties\":{{\"iothub-app-color\":\"red\",\"dt-subject\":\"thermostat1\"}}}},{{\"body\": \"{}\"}}]",
            B64.encode("first"),
            B64.encode([0u8, 159, 146, 150])
        );
        let (status, body, _) = batch(node);
        assert_eq!(status, 204, "{body}");
        let java = json!([
            {"body": B64.encode("third"), "base64Encoded": true,
             "properties": {"iothub-app-k": "v", "iothub-messageid": "m-3"}},
            {"body": "fourth, as text", "base64Encoded": false},
        ]);
        let (status, body, _) = batch(java.to_string());
        assert_eq!(status, 204, "{body}");
        // Not base64 without the flag: refused, nothing stored.
        let (status, err, _) = batch(json!([{"body": "not base64!"}]).to_string());
        assert_eq!((status, hub_code(&err)), (400, 400_004), "{err}");
        let (status, page, _) = send(s.hub_request(
            Method::GET,
            "/messages/events?from=0&limit=10&deviceId=batcher",
        ));
        assert_eq!(status, 200, "{page}");
        let messages = page["messages"].as_array().expect("messages");
        let bodies: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| {
                B64.decode(m["body"].as_str().expect("body"))
                    .expect("base64")
            })
            .collect();
        assert_eq!(
            bodies,
            vec![
                b"first".to_vec(),
                vec![0u8, 159, 146, 150],
                b"third".to_vec(),
                b"fourth, as text".to_vec()
            ]
        );
        assert_eq!(messages[0]["properties"]["color"], "red", "{}", messages[0]);
        assert_eq!(messages[2]["properties"], json!({"k": "v"}));
        assert_eq!(messages[2]["systemProperties"]["message-id"], "m-3");
    }
}
