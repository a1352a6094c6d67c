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

/// C2D over HTTPS as the Node and C device SDKs use it (hub-protocol §6): receive locks the
/// oldest message and counts the delivery, complete and reject remove it, abandon makes it
/// available again; a lost lock is 412 DeviceMessageLockLost; nothing waiting is 204.
#[test]
fn c2d_over_https_receive_complete_reject_abandon() {
    for backend in backends() {
        let s = TestServer::start(backend);
        let device = create(&s, "poller");
        let token = device_token(&s, &device);
        let receive = || {
            let response = s
                .client
                .get(s.url("/devices/poller/messages/devicebound"))
                .header("Authorization", &token)
                .send()
                .expect("receive");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            (status, headers, response.bytes().expect("body").to_vec())
        };
        let header = |headers: &reqwest::header::HeaderMap, name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let settle = |method: Method, path: String| {
            send(
                s.client
                    .request(method, s.url(&path))
                    .header("Authorization", &token)
                    .header("If-Match", path.rsplit('/').next().unwrap_or_default()),
            )
        };
        assert_eq!(receive().0, 204, "an empty queue");
        for (i, body) in ["one", "two"].iter().enumerate() {
            let (status, err, _) = send(
                s.hub_request(Method::POST, "/devices/poller/messages/deviceBound")
                    .header("iothub-messageid", format!("m-{i}"))
                    .header("iothub-correlationid", "corr")
                    .header("iothub-ack", "full")
                    .header("iothub-expiry", "2999-01-01T00:00:00Z")
                    .header("iothub-app-color", "red")
                    .body(*body),
            );
            assert_eq!(status, 204, "{err}");
        }
        let (status, first, body) = receive();
        assert_eq!((status, body.as_slice()), (200, b"one".as_slice()));
        let lock = header(&first, "etag").expect("ETag");
        assert!(lock.starts_with('"') && lock.ends_with('"'), "{lock}");
        let lock = lock.trim_matches('"').to_string();
        assert_eq!(header(&first, "iothub-messageid").as_deref(), Some("m-0"));
        assert_eq!(
            header(&first, "iothub-correlationid").as_deref(),
            Some("corr")
        );
        assert_eq!(
            header(&first, "iothub-to").as_deref(),
            Some("/devices/poller/messages/deviceBound")
        );
        assert_eq!(header(&first, "iothub-deliverycount").as_deref(), Some("1"));
        assert_eq!(header(&first, "iothub-ack").as_deref(), Some("full"));
        assert_eq!(
            header(&first, "iothub-expiry").as_deref(),
            Some("2999-01-01T00:00:00Z")
        );
        assert_eq!(header(&first, "iothub-app-color").as_deref(), Some("red"));
        assert!(header(&first, "iothub-enqueuedtime").is_some());
        // The first is locked: the next receive gets the second, then nothing.
        let (status, second, body) = receive();
        assert_eq!((status, body.as_slice()), (200, b"two".as_slice()));
        let second_lock = header(&second, "etag").expect("ETag");
        let second_lock = second_lock.trim_matches('"');
        assert_eq!(receive().0, 204, "both are locked");
        // Abandon (the Node SDK's spelling): available again, the delivery counted.
        let (status, err, _) = settle(
            Method::POST,
            format!("/devices/poller/messages/devicebound/{second_lock}/abandon"),
        );
        assert_eq!(status, 204, "{err}");
        let (status, again, body) = receive();
        assert_eq!((status, body.as_slice()), (200, b"two".as_slice()));
        assert_eq!(header(&again, "iothub-deliverycount").as_deref(), Some("2"));
        let again_lock = header(&again, "etag").expect("ETag");
        let again_lock = again_lock.trim_matches('"');
        // The abandoned lock is gone.
        let (status, err, headers) = settle(
            Method::DELETE,
            format!("/devices/poller/messages/deviceBound/{second_lock}"),
        );
        assert_eq!((status, hub_code(&err)), (412, 412_002), "{err}");
        assert_eq!(headers["iothub-errorcode"], "DeviceMessageLockLost");
        // Complete removes the first; completing twice is a lost lock.
        let path = format!("/devices/poller/messages/deviceBound/{lock}");
        let (status, err, _) = settle(Method::DELETE, path.clone());
        assert_eq!(status, 204, "{err}");
        let (status, err, _) = settle(Method::DELETE, path);
        assert_eq!((status, hub_code(&err)), (412, 412_002), "{err}");
        // Reject removes the second (dead-lettered: there is no feedback endpoint).
        let (status, err, _) = settle(
            Method::DELETE,
            format!("/devices/poller/messages/deviceBound/{again_lock}?reject"),
        );
        assert_eq!(status, 204, "{err}");
        assert_eq!(receive().0, 204);
        let (_, device, _) = send(s.hub_request(Method::GET, "/devices/poller"));
        assert_eq!(device["cloudToDeviceMessageCount"], 0, "{device}");

        // Another device's token receives nothing of this queue; an unknown device is 404.
        let other = create(&s, "other");
        send(
            s.hub_request(Method::POST, "/devices/poller/messages/deviceBound")
                .body("private"),
        );
        let (status, _, _) = send(
            s.client
                .get(s.url("/devices/poller/messages/deviceBound"))
                .header("Authorization", device_token(&s, &other)),
        );
        assert_eq!(status, 401);
        let (status, err, _) = send(
            s.client
                .get(s.url("/devices/ghost/messages/deviceBound"))
                .header("Authorization", &token),
        );
        assert_eq!((status, hub_code(&err)), (404, 404_001), "{err}");
        let (status, _, body) = receive();
        assert_eq!((status, body.as_slice()), (200, b"private".as_slice()));
    }
}

/// Methods and C2D reach devices whose connections run on different MQTT workers: the
/// listener hands connections to its three workers in turn, so three devices connected one
/// after the other land on three threads, while the service calls arrive on the HTTPS
/// listener's thread.
#[test]
fn methods_and_c2d_reach_devices_on_every_worker() {
    use zerotouch_tests::mqtt::{self, Login};
    let s = TestServer::start_with(Backend::Sqlite, |settings| settings.mqtt.workers = 3);
    let mut devices = Vec::new();
    for i in 0..3 {
        let id = format!("worker-{i}");
        let token = device_token(&s, &create(&s, &id));
        let username = mqtt::hub_username(&id);
        let mut device = mqtt::connect(
            s.mqtt_port(),
            &s.ca_bundle(),
            &Login {
                client_id: &id,
                username: &username,
                password: Some(&token),
                identity: None,
                clean_session: true,
            },
        )
        .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        device.subscribe("$iothub/methods/POST/#").unwrap();
        device
            .subscribe(&format!("devices/{id}/messages/devicebound/#"))
            .unwrap();
        devices.push((id, device));
    }
    for (i, (id, device)) in devices.iter_mut().enumerate() {
        let call = {
            let request = s
                .hub_request(Method::POST, &format!("/twins/{id}/methods"))
                .json(
                    &json!({"methodName": "ping", "responseTimeoutInSeconds": 10,
                              "payload": {"n": i}}),
                );
            std::thread::spawn(move || send(request))
        };
        let (topic, payload) = device.receive("$iothub/methods/POST/ping/").unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&payload).unwrap(),
            json!({"n": i})
        );
        let rid = topic.rsplit("$rid=").next().unwrap();
        device
            .publish(
                &format!("$iothub/methods/res/200/?$rid={rid}"),
                json!({"pong": i}).to_string().as_bytes(),
            )
            .unwrap();
        let (status, answer, _) = call.join().unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, json!({"status": 200, "payload": {"pong": i}}));

        let (status, err, _) = send(
            s.hub_request(Method::POST, &format!("/devices/{id}/messages/deviceBound"))
                .body(format!("c2d-{i}")),
        );
        assert_eq!(status, 204, "{err}");
        let (_, body) = device
            .receive(&format!("devices/{id}/messages/devicebound/"))
            .unwrap();
        assert_eq!(body, format!("c2d-{i}").into_bytes());
    }
    let (_, statistics, _) = send(s.hub_request(Method::GET, "/statistics/service"));
    assert_eq!(statistics["connectedDeviceCount"], 3, "{statistics}");
}

/// A saturated hub answers device twin requests 429 at once, as IoT Hub throttles, instead of
/// queueing them; it serves them again as soon as a turn is free.
#[test]
fn twin_requests_beyond_the_hub_s_capacity_get_429() {
    use zerotouch_service::hub::{TWIN_CONCURRENCY, TWIN_QUEUE_WAIT};
    use zerotouch_tests::mqtt::{self, Login};
    let s = TestServer::start(Backend::Sqlite);
    let token = device_token(&s, &create(&s, "busy"));
    let username = mqtt::hub_username("busy");
    let mut device = mqtt::connect(
        s.mqtt_port(),
        &s.ca_bundle(),
        &Login {
            client_id: "busy",
            username: &username,
            password: Some(&token),
            identity: None,
            clean_session: true,
        },
    )
    .unwrap();
    device.subscribe("$iothub/twin/res/#").unwrap();
    let hub = s.running().bound.hub.clone().expect("a hub");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Every turn taken, as by TWIN_CONCURRENCY requests in progress.
    let turns: Vec<_> = runtime.block_on(async {
        let mut turns = Vec::new();
        for _ in 0..TWIN_CONCURRENCY {
            turns.push(
                hub.twin_slot(std::time::Instant::now())
                    .await
                    .expect("a free turn"),
            );
        }
        turns
    });
    let started = std::time::Instant::now();
    device.publish("$iothub/twin/GET/?$rid=1", b"").unwrap();
    let (topic, body) = device.receive("$iothub/twin/res/").unwrap();
    assert_eq!(topic, "$iothub/twin/res/429/?$rid=1");
    assert!(String::from_utf8_lossy(&body).contains("retry"));
    assert!(started.elapsed() >= TWIN_QUEUE_WAIT);
    device
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            b"{\"a\":1}",
        )
        .unwrap();
    let (topic, _) = device.receive("$iothub/twin/res/").unwrap();
    assert_eq!(topic, "$iothub/twin/res/429/?$rid=2");
    let (_, twin, _) = send(s.hub_request(Method::GET, "/twins/busy"));
    assert!(twin["properties"]["reported"].get("a").is_none(), "{twin}");

    drop(turns);
    device
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=3",
            b"{\"a\":1}",
        )
        .unwrap();
    let (topic, _) = device.receive("$iothub/twin/res/").unwrap();
    assert!(topic.starts_with("$iothub/twin/res/204/?$rid=3"), "{topic}");
    let (_, metrics, _) = send(
        s.client
            .get(format!("https://localhost:{}/metrics", s.https_port())),
    );
    let text = metrics.as_str().unwrap().to_string();
    assert!(
        text.contains("zerotouch_hub_twin_throttled_total 2"),
        "{text}"
    );
}
