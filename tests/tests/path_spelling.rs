//! Paths as other SDKs spell them (`http::routes::normalize`): the fixed words of every route
//! in any case and a trailing slash, as Azure accepts them, on the management API, the DPS
//! device API and the hub. Ids keep their case. The Node.js SDK calls that needed it are in
//! tests/node/service.test.js.

use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_tests::{TestServer, backends, send};

fn ok(request: reqwest::blocking::RequestBuilder) -> Value {
    let (status, body, _) = send(request);
    assert!((200..300).contains(&status), "{status} {body}");
    body
}

#[test]
fn fixed_words_in_any_case_and_trailing_slashes_route_ids_keep_their_case() {
    for backend in backends() {
        let s = TestServer::start(backend);

        // Management API: the Node provisioning service client's spellings.
        let group = ok(s
            .request(Method::PUT, "/enrollmentGroups/Fleet-A")
            .json(&json!({"attestation": {"type": "symmetricKey"}})));
        let keys = ok(s.request(
            Method::POST,
            "/enrollmentgroups/Fleet-A/attestationmechanism",
        ));
        assert_eq!(
            keys["symmetricKey"]["primaryKey"],
            group["attestation"]["symmetricKey"]["primaryKey"]
        );
        let keys = ok(s.request(
            Method::POST,
            "/ENROLLMENTGROUPS/Fleet-A/AttestationMechanism/",
        ));
        assert_eq!(keys["type"], "symmetricKey");
        let bulk = ok(s.request(Method::POST, "/enrollments/").json(&json!({
            "mode": "create",
            "enrollments": [{"registrationId": "Dev-B", "attestation": {"type": "symmetricKey"}}],
        })));
        assert_eq!(bulk["isSuccessful"], true, "{bulk}");
        let enrollment = ok(s.request(Method::GET, "/Enrollments/Dev-B/"));
        assert_eq!(enrollment["registrationId"], "Dev-B");
        let key =
            ok(s.request(Method::POST, "/enrollments/dev-b/attestationMechanism"))["symmetricKey"]
                ["primaryKey"]
                .as_str()
                .expect("key")
                .to_string();

        // DPS device API: register and poll with odd spellings.
        let sas = s.device_sas("Dev-B", &key, 3600);
        let scope = s.id_scope.to_ascii_uppercase();
        let (status, accepted, _) = send(
            s.dps_request(
                &s.client,
                Method::PUT,
                &format!("/{scope}/Registrations/Dev-B/REGISTER/"),
                Some(&sas),
            )
            .json(&json!({"registrationId": "Dev-B"})),
        );
        assert_eq!(status, 202, "{accepted}");
        let operation = accepted["operationId"].as_str().expect("operationId");
        let mut state = Value::Null;
        for _ in 0..50 {
            state = ok(s.dps_request(
                &s.client,
                Method::GET,
                &format!("/{scope}/registrations/Dev-B/Operations/{operation}"),
                Some(&sas),
            ));
            if state["status"] != "assigning" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(state["status"], "assigned", "{state}");
        let device_id = state["registrationState"]["deviceId"]
            .as_str()
            .expect("deviceId")
            .to_string();
        assert_eq!(device_id, "Dev-B");

        // Hub: the Node registry lists with `GET /devices/`; ids stay case-sensitive.
        let listed = ok(s.hub_request(Method::GET, "/devices/"));
        assert!(
            listed
                .as_array()
                .expect("array")
                .iter()
                .any(|d| d["deviceId"] == "Dev-B"),
            "{listed}"
        );
        let device = ok(s.hub_request(Method::GET, "/DEVICES/Dev-B/"));
        assert_eq!(device["deviceId"], "Dev-B");
        let (status, _, _) = send(s.hub_request(Method::GET, "/Devices/dev-b"));
        assert_eq!(status, 404, "hub device ids are case-sensitive");
        let twin = ok(s.hub_request(Method::GET, "/Twins/Dev-B/"));
        assert_eq!(twin["deviceId"], "Dev-B");
        let stats = ok(s.hub_request(Method::GET, "/Statistics/Devices/"));
        assert_eq!(stats["totalDeviceCount"], 1, "{stats}");

        // An id that spells a fixed word in another case is still an id.
        ok(s.hub_request(Method::PUT, "/devices/Query")
            .json(&json!({"deviceId": "Query"})));
        assert_eq!(
            ok(s.hub_request(Method::GET, "/devices/Query"))["deviceId"],
            "Query"
        );

        // What matches no route still does not, with the error shape of its API.
        let (status, body, _) = send(s.request(Method::GET, "/Nothing/Here/"));
        assert_eq!(status, 404, "{body}");
        let (status, body, headers) = send(s.hub_request(Method::GET, "/devices/Dev-B/nothing"));
        assert_eq!(status, 404, "{body}");
        assert!(headers.contains_key("iothub-errorcode"), "{headers:?}");

        // Metrics are labelled with the registered template, whatever the spelling.
        let (_, _, _) = send(s.hub_request(Method::GET, "/TWINS/Dev-B"));
        let metrics = s
            .client
            .get(format!("https://localhost:{}/metrics", s.https_port()))
            .send()
            .expect("metrics")
            .text()
            .expect("text");
        assert!(
            metrics.contains("route=\"/twins/{id}\""),
            "no /twins/{{id}} label in the metrics"
        );
        assert!(
            !metrics.contains("route=\"/TWINS"),
            "a raw path became a label"
        );
    }
}
