//! The DPS device API over HTTPS (dps-protocol §1, §3.1–§3.3, §6.2–§6.3), on SQLite and
//! PostgreSQL: what the C SDK and iot-identity-service send, byte for byte where it matters
//! (headers, lower-case `%2f` SAS tokens), X.509 groups through intermediates, certificates
//! issued from a CSR, refusals (always the Azure error JSON, never a 5xx, never a record) and
//! one device registering many times at once. The Python SDK flows are in
//! tests/python/test_provisioning_sdk.py.

use std::process::Command;
use std::sync::Barrier;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rcgen::ExtendedKeyUsagePurpose;
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use zerotouch_attestation::symmetric_key;
use zerotouch_service::time::now_unix as now;
use zerotouch_tests::{
    DEVICE_API_VERSION, TestServer, backends, c_sdk_device_sas, c_sdk_url_encode, client_trusting,
    each_backend, error_code, pki, send,
};

/// The Azure error JSON (§1.7) with the expected status and code, and `x-ms-error-code`.
fn assert_error(
    (status, body, headers): &(u16, Value, HeaderMap),
    want_status: u16,
    want_code: u64,
    what: &str,
) {
    assert!(
        *status < 500,
        "{what}: a 5xx for a client error: {status} {body}"
    );
    assert_eq!(
        (*status, error_code(body)),
        (want_status, want_code),
        "{what}: {body}"
    );
    for field in ["trackingId", "message", "timestampUtc"] {
        assert!(
            body[field].as_str().is_some_and(|v| !v.is_empty()),
            "{what}: no {field} in {body}"
        );
    }
    assert_eq!(
        headers.get("x-ms-error-code").and_then(|v| v.to_str().ok()),
        Some(want_code.to_string().as_str()),
        "{what}"
    );
}

/// No registration record and no hub identity for `id`.
fn assert_nothing_stored(s: &TestServer, id: &str) {
    let (status, body, _) = send(s.request(Method::GET, &format!("/registrations/{id}")));
    assert_eq!(
        (status, error_code(&body)),
        (404, 404_202),
        "registration record of {id}: {body}"
    );
    let (status, body, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
    assert_eq!(status, 404, "hub identity of {id}: {body}");
}

/// An individual symmetric-key enrollment; returns (primary, secondary) key.
fn enroll_symmetric(s: &TestServer, id: &str, extra: Value) -> (String, String) {
    let mut body = json!({"attestation": {"type": "symmetricKey"}});
    if let (Some(map), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        map.extend(extra.clone());
    }
    let (status, created, _) = send(
        s.request(Method::PUT, &format!("/enrollments/{id}"))
            .json(&body),
    );
    assert_eq!(status, 200, "{created}");
    let keys = &created["attestation"]["symmetricKey"];
    (
        keys["primaryKey"].as_str().expect("primary").to_string(),
        keys["secondaryKey"]
            .as_str()
            .expect("secondary")
            .to_string(),
    )
}

/// A symmetric-key enrollment group; returns its primary key.
fn group_symmetric(s: &TestServer, group: &str, extra: Value) -> String {
    let mut body = json!({"attestation": {"type": "symmetricKey"}});
    if let (Some(map), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        map.extend(extra.clone());
    }
    let (status, created, _) = send(
        s.request(Method::PUT, &format!("/enrollmentGroups/{group}"))
            .json(&body),
    );
    assert_eq!(status, 200, "{created}");
    created["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("primary")
        .to_string()
}

fn register_path(s: &TestServer, id: &str) -> String {
    format!("/{}/registrations/{id}/register", s.id_scope)
}

fn operation_path(s: &TestServer, id: &str, operation_id: &str) -> String {
    format!(
        "/{}/registrations/{id}/operations/{operation_id}",
        s.id_scope
    )
}

fn status_path(s: &TestServer, id: &str) -> String {
    format!("/{}/registrations/{id}", s.id_scope)
}

/// The headers the C SDK's HTTP transport sends on every call (§1.3).
fn c_sdk(request: RequestBuilder) -> RequestBuilder {
    request
        .header("UserAgent", "prov_device_client/1.0")
        .header("Accept", "application/json")
        .header("Connection", "keep-alive")
        .header("Content-Type", "application/json; charset=utf-8")
}

/// `PUT …/register` with a JSON body, C SDK headers and `sas` (none: X.509 through `client`).
fn register(
    s: &TestServer,
    client: &Client,
    id: &str,
    sas: Option<&str>,
    body: &Value,
) -> (u16, Value, HeaderMap) {
    send(
        c_sdk(s.dps_request(client, Method::PUT, &register_path(s, id), sas))
            .body(body.to_string()),
    )
}

/// `GET …/operations/{operationId}` as the C SDK sends it (with a Content-Type, no body).
fn poll(
    s: &TestServer,
    client: &Client,
    id: &str,
    operation_id: &str,
    sas: Option<&str>,
) -> (u16, Value, HeaderMap) {
    send(c_sdk(s.dps_request(
        client,
        Method::GET,
        &operation_path(s, id, operation_id),
        sas,
    )))
}

/// The 202 of a register (§1.5, §6.3): `assigning` with an operation id, an integer
/// `retry-after`, JSON. Returns the operation id.
fn assert_accepted(response: &(u16, Value, HeaderMap), what: &str) -> String {
    let (status, body, headers) = response;
    assert_eq!(
        *status, 202,
        "{what}: register must answer exactly 202: {body}"
    );
    assert_eq!(body["status"], "assigning", "{what}: {body}");
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{what}: no retry-after"));
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("{what}: retry-after {retry_after:?} is not integer seconds"));
    assert!(
        (1..=300).contains(&seconds),
        "{what}: retry-after {seconds}"
    );
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: content-type {content_type:?}"
    );
    body["operationId"]
        .as_str()
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| panic!("{what}: no operationId in {body}"))
        .to_string()
}

/// The final poll (§1.5, §6.2): 200 `assigned` with hub, device id, etag and dates. Returns
/// the registrationState.
fn assert_assigned(
    s: &TestServer,
    response: &(u16, Value, HeaderMap),
    id: &str,
    operation_id: &str,
) -> Value {
    let (status, body, _) = response;
    assert_eq!(*status, 200, "{body}");
    assert_eq!(body["status"], "assigned", "{body}");
    assert_eq!(body["operationId"], operation_id, "{body}");
    let state = &body["registrationState"];
    // Registration ids are case-insensitive: the canonical spelling may differ from the path's.
    assert!(
        state["registrationId"]
            .as_str()
            .is_some_and(|r| r.eq_ignore_ascii_case(id)),
        "{body}"
    );
    assert_eq!(state["status"], "assigned", "{body}");
    assert_eq!(state["assignedHub"], s.settings.hub_hostname(), "{body}");
    assert!(
        state["deviceId"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert!(
        state["etag"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    for date in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc"] {
        let text = state[date].as_str().unwrap_or_default();
        assert!(
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{date} {text:?} is not RFC 3339"
        );
    }
    assert!(
        state.get("operationId").is_none(),
        "internal field leaked: {body}"
    );
    state.clone()
}

/// Register and poll to `assigned`; returns the registrationState.
fn register_and_poll(
    s: &TestServer,
    client: &Client,
    id: &str,
    sas: Option<&str>,
    body: &Value,
) -> Value {
    let accepted = register(s, client, id, sas, body);
    let operation_id = assert_accepted(&accepted, id);
    let polled = poll(s, client, id, &operation_id, sas);
    assert_assigned(s, &polled, id, &operation_id)
}

/// The helper below builds tokens exactly like the spec's test vectors (§3.1).
#[test]
fn c_sdk_token_helper_matches_the_spec_vectors() {
    let derived =
        symmetric_key::derive_device_key("a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=", "dev-01")
            .unwrap();
    assert_eq!(derived, "3wWY86l94eFKP6eOuPmct7p/HxH8AVogU/exUD3ZtQc=");
    let token = c_sdk_device_sas("0ne00000001", "dev-01", &derived, 1_700_000_000);
    let sig = c_sdk_url_encode("3FsbINzA0+w8+q1mLpDPnnkTIxsihO4tSSjCmZm+Mxw=");
    assert_eq!(
        token,
        format!(
            "SharedAccessSignature sr=0ne00000001%2fregistrations%2fdev-01&sig={sig}&se=1700000000&skn=registration"
        )
    );
    assert!(sig.contains("%2b") && sig.ends_with("%3d"), "{sig}");
}

/// §1.3, §3.1, §6.2: the C SDK's HTTP flow with a symmetric-key individual enrollment.
#[test]
fn c_sdk_symmetric_key_individual_enrollment() {
    each_backend(|s| {
        let id = "c-sdk-dev-01";
        let (primary, secondary) = enroll_symmetric(s, id, json!({}));
        let token = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 2400);
        assert!(token.contains(&format!("sr={}%2fregistrations%2f{id}&", s.id_scope)));

        // Register: 202 assigning (unknown body fields are ignored).
        let accepted = register(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id, "someFutureField": {"x": 1}}),
        );
        let operation_id = assert_accepted(&accepted, "C SDK register");
        assert!(
            accepted.1.get("registrationState").is_none()
                || accepted.1["registrationState"]["registrationId"] == id,
            "{}",
            accepted.1
        );

        // Poll: 200 assigned, with what the C SDK reads.
        let polled = poll(s, &s.client, id, &operation_id, Some(&token));
        let state = assert_assigned(s, &polled, id, &operation_id);
        assert_eq!(state["deviceId"], id);
        assert_eq!(state["substatus"], "initialAssignment");
        assert_eq!(state["symmetricKey"]["enrollmentGroupId"], Value::Null);
        let content_type = polled.2["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );

        // The hub identity carries the enrollment's keys.
        let (status, device, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
        assert_eq!(status, 200, "{device}");
        assert_eq!(device["authentication"]["type"], "sas");
        assert_eq!(
            device["authentication"]["symmetricKey"]["primaryKey"],
            primary
        );

        // Status lookup: the bare registrationState.
        let (status, looked_up, _) = send(
            c_sdk(s.dps_request(&s.client, Method::POST, &status_path(s, id), Some(&token)))
                .body(json!({"registrationId": id}).to_string()),
        );
        assert_eq!(status, 200, "{looked_up}");
        assert_eq!(looked_up["registrationId"], id, "{looked_up}");
        assert_eq!(looked_up["status"], "assigned");
        assert_eq!(looked_up["assignedHub"], state["assignedHub"]);
        assert_eq!(looked_up["deviceId"], id);
        assert_eq!(looked_up["etag"], state["etag"]);
        for wrapper in ["registrationState", "operationId", "issuedCertificateChain"] {
            assert!(looked_up.get(wrapper).is_none(), "{looked_up}");
        }

        // Python's token (upper-case %2F, no skn) with the secondary key works as well; the
        // second registration migrates the device data.
        let python = s.device_sas(id, &secondary, 3600);
        assert!(python.contains("%2Fregistrations%2F") && !python.contains("skn="));
        let again = register_and_poll(
            s,
            &s.client,
            id,
            Some(&python),
            &json!({"payload": null, "registrationId": id}),
        );
        assert_eq!(again["substatus"], "deviceDataMigrated");
        assert_eq!(again["createdDateTimeUtc"], state["createdDateTimeUtc"]);

        // An unknown operation id is 404 with the error JSON.
        let token = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 2400);
        let unknown = poll(s, &s.client, id, "5.0000.nope", Some(&token));
        assert_error(&unknown, 404, 404_000, "unknown operation");
    });
}

/// DPS registration ids may contain `:` (§1.1); the C SDK URL-encodes it in the path and in
/// `sr` with lower-case hex (`%3a`). The hub identity gets the same id (IoT Hub device ids allow
/// `:` too).
#[test]
fn c_sdk_registration_id_with_a_colon() {
    each_backend(|s| {
        let colon = "c-sdk:dev-02";
        let (colon_key, _) = enroll_symmetric(s, colon, json!({}));
        let token = c_sdk_device_sas(&s.id_scope, colon, &colon_key, now() + 2400);
        assert!(token.contains("c-sdk%3adev-02"), "{token}");
        let encoded = c_sdk_url_encode(colon);
        let accepted = register(
            s,
            &s.client,
            &encoded,
            Some(&token),
            &json!({"registrationId": colon}),
        );
        let operation_id = assert_accepted(&accepted, "id with a colon");
        let polled = poll(s, &s.client, &encoded, &operation_id, Some(&token));
        let state = assert_assigned(s, &polled, colon, &operation_id);
        assert_eq!(state["deviceId"], colon);

        let (status, device, _) = send(s.hub_request(Method::GET, "/devices/c-sdk:dev-02"));
        assert_eq!(status, 200, "{device}");
    });
}

/// §1.1: registration ids are case-insensitive. A device that registers with another case than
/// its enrollment is the same registration and the same hub identity (no second device).
#[test]
fn registration_ids_are_case_insensitive() {
    each_backend(|s| {
        let (primary, _) = enroll_symmetric(s, "case-dev", json!({}));
        for id in ["case-dev", "CASE-DEV", "Case-Dev"] {
            let token = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 2400);
            let state = register_and_poll(
                s,
                &s.client,
                id,
                Some(&token),
                &json!({"registrationId": id}),
            );
            assert_eq!(state["deviceId"], "case-dev", "registered as {id}: {state}");
        }
        let (status, devices, _) = send(
            s.hub_request(Method::POST, "/devices/query")
                .json(&json!({"query": "SELECT * FROM devices"})),
        );
        assert_eq!(status, 200, "{devices}");
        let ids: Vec<&str> = devices
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["deviceId"].as_str())
            .collect();
        assert_eq!(ids, ["case-dev"], "one enrollment, one hub identity");
    });
}

/// §6.3: iot-identity-service registers with a group's derived key: exactly 202 with an
/// operation id, then polls until 200 `assigned`.
#[test]
fn iot_identity_service_group_symmetric_key() {
    each_backend(|s| {
        let group_key =
            group_symmetric(s, "edge-fleet", json!({"capabilities": {"iotEdge": true}}));
        let id = "edge-gw-01";
        let derived = symmetric_key::derive_device_key(&group_key, id).unwrap();
        // aziot's token: upper-case encoding, fields in another order, skn=registration.
        let expiry = now() + 3600;
        let signed = symmetric_key::sign(
            &symmetric_key::registration_resource(&s.id_scope, id),
            &derived,
            expiry,
            Some("registration"),
        )
        .unwrap();
        let fields: std::collections::HashMap<&str, &str> = signed
            .trim_start_matches("SharedAccessSignature ")
            .split('&')
            .filter_map(|f| f.split_once('='))
            .collect();
        let token = format!(
            "SharedAccessSignature sig={}&se={}&skn=registration&sr={}",
            fields["sig"], fields["se"], fields["sr"]
        );
        let accepted = send(
            s.dps_request(&s.client, Method::PUT, &register_path(s, id), Some(&token))
                .header("Content-Type", "application/json")
                .body(json!({"registrationId": id}).to_string()),
        );
        let operation_id = assert_accepted(&accepted, "aziot register");
        // aziot polls (it ignores retry-after) and accepts 200 or 202; 202 must then carry
        // registrationState.registrationId.
        let mut polled = None;
        for _ in 0..10 {
            let response = send(s.dps_request(
                &s.client,
                Method::GET,
                &operation_path(s, id, &operation_id),
                Some(&token),
            ));
            match response.0 {
                200 => {
                    polled = Some(response);
                    break;
                }
                202 => {
                    assert_eq!(response.1["registrationState"]["registrationId"], id);
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                other => panic!("aziot poll: {other} {}", response.1),
            }
        }
        let polled = polled.expect("assigned within 10 polls");
        let state = assert_assigned(s, &polled, id, &operation_id);
        assert_eq!(state["deviceId"], id);
        assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "edge-fleet");

        // The hub identity uses the derived key and the group's capabilities.
        let (status, device, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
        assert_eq!(status, 200, "{device}");
        assert_eq!(
            device["authentication"]["symmetricKey"]["primaryKey"],
            derived
        );
        assert_eq!(device["capabilities"]["iotEdge"], true);

        // The record belongs to the group.
        let (status, members, _) = send(s.request(Method::POST, "/registrations/edge-fleet/query"));
        assert_eq!(status, 200, "{members}");
        let ids: Vec<&str> = members
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["registrationId"].as_str())
            .collect();
        assert_eq!(ids, [id]);
    });
}

/// §1.6–§1.7: every refusal of a symmetric-key device is the Azure error JSON with its own
/// code, never a 5xx, and leaves no record and no hub identity.
#[test]
fn symmetric_key_refusals_store_nothing() {
    each_backend(|s| {
        let id = "refused-01";
        let (primary, _) = enroll_symmetric(s, id, json!({}));
        let (other_key, _) = enroll_symmetric(s, "refused-02", json!({}));
        // A group exists, so "unknown" also means "no group key matches".
        group_symmetric(s, "some-group", json!({}));
        let body = json!({"registrationId": id});
        let good = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 2400);

        let expired = c_sdk_device_sas(&s.id_scope, id, &primary, now() - 3600);
        let response = register(s, &s.client, id, Some(&expired), &body);
        assert_error(&response, 401, 401_002, "expired SAS");

        // A token for refused-02 (its own key, its own resource) used on refused-01's path.
        let for_other = c_sdk_device_sas(&s.id_scope, "refused-02", &other_key, now() + 2400);
        let response = register(s, &s.client, id, Some(&for_other), &body);
        assert_error(&response, 401, 401_002, "SAS for another registration");
        // The right resource signed with another enrollment's key.
        let wrong_key = c_sdk_device_sas(&s.id_scope, id, &other_key, now() + 2400);
        let response = register(s, &s.client, id, Some(&wrong_key), &body);
        assert_error(&response, 401, 401_002, "wrong key");
        let random = symmetric_key::generate_key().unwrap();
        let response = register(
            s,
            &s.client,
            id,
            Some(&s.device_sas(id, &random, 3600)),
            &body,
        );
        assert_error(&response, 401, 401_002, "random key");

        // A token for another ID scope.
        let other_scope = c_sdk_device_sas("0ne99999999", id, &primary, now() + 2400);
        let response = register(s, &s.client, id, Some(&other_scope), &body);
        assert_error(&response, 401, 401_002, "SAS for another scope");

        // skn naming something else than `registration`.
        let skn = good.replace("skn=registration", "skn=provisioningserviceowner");
        let response = register(s, &s.client, id, Some(&skn), &body);
        assert_error(&response, 401, 401_002, "skn");

        // Unreadable credentials, and none at all.
        let response = register(
            s,
            &s.client,
            id,
            Some("SharedAccessSignature garbage"),
            &body,
        );
        assert_error(&response, 401, 401_000, "malformed SAS");
        let response = register(s, &s.client, id, None, &body);
        assert_error(&response, 401, 401_000, "no credentials");

        // Unknown enrollment: no individual enrollment, no group key matches.
        let ghost = "ghost-01";
        let response = register(
            s,
            &s.client,
            ghost,
            Some(&c_sdk_device_sas(
                &s.id_scope,
                ghost,
                &primary,
                now() + 2400,
            )),
            &json!({"registrationId": ghost}),
        );
        assert_error(&response, 401, 401_002, "unknown enrollment");
        assert_nothing_stored(s, ghost);

        // Bad bodies with good credentials.
        let response = send(
            c_sdk(s.dps_request(&s.client, Method::PUT, &register_path(s, id), Some(&good)))
                .body("{\"registrationId\": "),
        );
        assert_error(&response, 400, 400_000, "malformed JSON");
        let response = register(
            s,
            &s.client,
            id,
            Some(&good),
            &json!({"registrationId": "refused-02"}),
        );
        assert_error(&response, 400, 400_011, "body id differs from path id");
        assert_eq!(response.1["info"]["field"], "registrationId");
        let response = register(
            s,
            &s.client,
            id,
            Some(&good),
            &json!({"registrationId": id, "payload": "x".repeat(300 * 1024)}),
        );
        assert_error(&response, 413, 413_001, "oversize body");

        // api-version is required; the ID scope must be ours.
        let response = send(
            c_sdk(
                s.client
                    .put(s.device_url(&register_path(s, id), None))
                    .header("Authorization", &good),
            )
            .body(body.to_string()),
        );
        assert_error(&response, 400, 400_013, "missing api-version");
        let response = send(
            c_sdk(
                s.client
                    .put(s.device_url(
                        &format!("/0ne99999999/registrations/{id}/register"),
                        Some(DEVICE_API_VERSION),
                    ))
                    .header("Authorization", &good),
            )
            .body(body.to_string()),
        );
        assert_error(&response, 404, 404_000, "unknown ID scope");
        // The status lookup refuses the same way.
        let response = send(
            c_sdk(s.dps_request(&s.client, Method::POST, &status_path(s, id), Some(&expired)))
                .body(body.to_string()),
        );
        assert_error(&response, 401, 401_002, "status lookup with an expired SAS");
        let response = send(
            c_sdk(s.dps_request(&s.client, Method::POST, &status_path(s, id), Some(&good)))
                .body(body.to_string()),
        );
        assert_error(&response, 404, 404_202, "status lookup before registering");

        assert_nothing_stored(s, id);
        assert_nothing_stored(s, "refused-02");

        // Disabled: 200 with status "disabled" (C SDK: DISABLED), nothing stored.
        let off = "disabled-01";
        let (off_key, _) = enroll_symmetric(s, off, json!({"provisioningStatus": "disabled"}));
        let (status, response, _) = register(
            s,
            &s.client,
            off,
            Some(&c_sdk_device_sas(&s.id_scope, off, &off_key, now() + 2400)),
            &json!({"registrationId": off}),
        );
        assert_eq!(status, 200, "{response}");
        assert_eq!(response["status"], "disabled", "{response}");
        assert_eq!(response["registrationState"]["status"], "disabled");
        assert_nothing_stored(s, off);
        // A disabled group refuses its members the same way.
        let off_group_key =
            group_symmetric(s, "off-group", json!({"provisioningStatus": "disabled"}));
        let member = "off-member-01";
        let derived = symmetric_key::derive_device_key(&off_group_key, member).unwrap();
        let (status, response, _) = register(
            s,
            &s.client,
            member,
            Some(&c_sdk_device_sas(
                &s.id_scope,
                member,
                &derived,
                now() + 2400,
            )),
            &json!({"registrationId": member}),
        );
        assert_eq!(
            (status, &response["status"]),
            (200, &json!("disabled")),
            "{response}"
        );
        assert_nothing_stored(s, member);
    });
}

/// A client presenting `leaf` (plus `chain`, PEM) with its PKCS#8 `key`.
fn device_client(s: &TestServer, leaf: &str, chain: &[&str], key: &str) -> Client {
    let mut pem = leaf.to_string();
    for c in chain {
        pem.push_str(c);
    }
    client_trusting(&s.ca_bundle(), Some((&pem, key)))
}

fn upload_ca(s: &TestServer, name: &str, pem: &str, verified: bool) -> Value {
    let (status, uploaded, _) = send(
        s.request(Method::PUT, &format!("/certificates/{name}"))
            .json(&json!({"certificate": pem, "isVerified": verified})),
    );
    assert_eq!(status, 200, "{uploaded}");
    assert_eq!(uploaded["properties"]["isVerified"], verified);
    uploaded
}

fn x509_group(s: &TestServer, group: &str, x509: Value) {
    let (status, created, _) = send(
        s.request(Method::PUT, &format!("/enrollmentGroups/{group}"))
            .json(&json!({"attestation": {"type": "x509", "x509": x509}})),
    );
    assert_eq!(status, 200, "{created}");
}

/// §3.3: X.509 refusals are 401 with the error JSON and store nothing.
#[test]
fn x509_refusals_store_nothing() {
    each_backend(|s| {
        let ca_a = pki::TestCa::new("CA A");
        upload_ca(s, "ca-a", &ca_a.cert_pem, true);
        x509_group(s, "group-a", json!({"caReferences": {"primary": "ca-a"}}));
        let ca_u = pki::TestCa::new("CA Unverified");
        upload_ca(s, "ca-u", &ca_u.cert_pem, false);
        x509_group(s, "group-u", json!({"caReferences": {"primary": "ca-u"}}));
        let body = |id: &str| json!({"registrationId": id});

        // Chain to a CA no group knows.
        let id = "x-unknown-ca";
        let (leaf, key) = pki::TestCa::new("CA B").issue(id);
        let response = register(s, &device_client(s, &leaf, &[], &key), id, None, &body(id));
        assert_error(&response, 401, 401_002, "unknown CA");
        assert_nothing_stored(s, id);

        // CN differs from the registration id.
        let id = "x-cn-mismatch";
        let (leaf, key) = ca_a.issue("somebody-else");
        let response = register(s, &device_client(s, &leaf, &[], &key), id, None, &body(id));
        assert_error(&response, 401, 401_002, "CN mismatch");
        assert_nothing_stored(s, id);
        assert_nothing_stored(s, "somebody-else");

        // A serverAuth-only leaf is not a client certificate.
        let id = "x-server-eku";
        let (leaf, key) = ca_a.issue_with_eku(id, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        let response = register(s, &device_client(s, &leaf, &[], &key), id, None, &body(id));
        assert_error(&response, 401, 401_002, "serverAuth-only EKU");
        assert_nothing_stored(s, id);

        // A group on a CA that never proved possession.
        let id = "x-unverified";
        let (leaf, key) = ca_u.issue(id);
        let response = register(s, &device_client(s, &leaf, &[], &key), id, None, &body(id));
        assert_error(&response, 401, 401_002, "unverified CA reference");
        assert_nothing_stored(s, id);

        // A leaf from an intermediate, without the intermediate: no path to the group's CA.
        let id = "x-no-intermediate";
        let intermediate = ca_a.intermediate("CA A Intermediate");
        let (leaf, key) = intermediate.issue(id);
        let response = register(s, &device_client(s, &leaf, &[], &key), id, None, &body(id));
        assert_error(&response, 401, 401_002, "missing intermediate");
        assert_nothing_stored(s, id);

        // The same leaf with its intermediate is accepted (the refusals above were for cause).
        let client = device_client(s, &leaf, &[&intermediate.cert_pem], &key);
        let state = register_and_poll(s, &client, id, None, &body(id));
        assert_eq!(state["x509"]["enrollmentGroupId"], "group-a");
    });
}

/// §3.3, §5.6: a group on a root CA verified by proof of possession; devices whose leaf is
/// signed by an intermediate present leaf + intermediate; a group on the intermediate is
/// closer and wins.
#[test]
fn x509_group_through_an_intermediate() {
    each_backend(|s| {
        let root = pki::TestCa::new("Fleet Root");
        let uploaded = upload_ca(s, "fleet-root", &root.cert_pem, false);
        let (status, pending, _) = send(
            s.request(
                Method::POST,
                "/certificates/fleet-root/generateVerificationCode",
            )
            .header("If-Match", uploaded["etag"].as_str().unwrap()),
        );
        assert_eq!(status, 200, "{pending}");
        let code = pending["properties"]["verificationCode"].as_str().unwrap();
        let (proof, _) = root.issue(code);
        let (status, verified, _) = send(
            s.request(Method::POST, "/certificates/fleet-root/verify")
                .header("If-Match", pending["etag"].as_str().unwrap())
                .json(&json!({"certificate": proof})),
        );
        assert_eq!(status, 200, "{verified}");
        assert_eq!(verified["properties"]["isVerified"], true);
        x509_group(
            s,
            "by-root",
            json!({"caReferences": {"primary": "fleet-root"}}),
        );

        let intermediate = root.intermediate("Fleet Intermediate");
        let id = "fleet-dev-01";
        let (leaf, key) = intermediate.issue(id);
        let client = device_client(s, &leaf, &[&intermediate.cert_pem], &key);
        let state = register_and_poll(s, &client, id, None, &json!({"registrationId": id}));
        assert_eq!(state["deviceId"], id);
        let x509 = &state["x509"];
        assert_eq!(x509["enrollmentGroupId"], "by-root", "{state}");
        assert_eq!(x509["certificateInfo"]["subjectName"], format!("CN={id}"));
        assert_eq!(
            x509["signingCertificateInfo"]["subjectName"], "CN=Fleet Root",
            "{state}"
        );
        for field in [
            "sha1Thumbprint",
            "sha256Thumbprint",
            "issuerName",
            "notAfterUtc",
        ] {
            assert!(
                x509["signingCertificateInfo"][field].is_string(),
                "{field}: {state}"
            );
        }
        // The hub identity is CA-authenticated, and the device can use it with the same cert.
        let (status, device, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
        assert_eq!(status, 200, "{device}");
        assert_eq!(device["authentication"]["type"], "certificateAuthority");
        let (status, body, _) = send(
            client
                .post(s.url(&format!("/devices/{id}/messages/events")))
                .body("from an X.509 group device"),
        );
        assert_eq!(
            status, 204,
            "hub telemetry with the device certificate: {body}"
        );
        // The status lookup with the certificate.
        let (status, looked_up, _) = send(
            c_sdk(s.dps_request(&client, Method::POST, &status_path(s, id), None))
                .body(json!({"registrationId": id}).to_string()),
        );
        assert_eq!(status, 200, "{looked_up}");
        assert_eq!(looked_up["x509"]["enrollmentGroupId"], "by-root");

        // A group on the intermediate (a signing certificate that rolls up to the verified
        // root) is closer than the root's group: it wins, for new and returning devices.
        x509_group(
            s,
            "by-intermediate",
            json!({"signingCertificates": {"primary": {"certificate": intermediate.cert_pem}}}),
        );
        let id2 = "fleet-dev-02";
        let (leaf2, key2) = intermediate.issue(id2);
        let client2 = device_client(s, &leaf2, &[&intermediate.cert_pem], &key2);
        let state = register_and_poll(s, &client2, id2, None, &json!({"registrationId": id2}));
        assert_eq!(
            state["x509"]["enrollmentGroupId"], "by-intermediate",
            "{state}"
        );
        assert_eq!(
            state["x509"]["signingCertificateInfo"]["subjectName"],
            "CN=Fleet Intermediate"
        );
        let state = register_and_poll(s, &client, id, None, &json!({"registrationId": id}));
        assert_eq!(
            state["x509"]["enrollmentGroupId"], "by-intermediate",
            "{state}"
        );
    });
}

/// Writes the issued chain, runs `openssl verify -purpose sslclient` against the server's CA
/// bundle, then sends hub telemetry over HTTPS with the issued certificate (no Authorization).
fn check_issued_certificate(s: &TestServer, id: &str, chain_b64: &[Value], key_pem: &str) {
    assert_eq!(
        chain_b64.len(),
        3,
        "leaf, intermediate, root: {chain_b64:?}"
    );
    let pems: Vec<String> = chain_b64
        .iter()
        .map(|c| pki::pem_of_der(&B64.decode(c.as_str().expect("string")).expect("base64 DER")))
        .collect();
    let leaf = zerotouch_attestation::x509::parse_certificate(&pems[0]).expect("leaf parses");
    assert_eq!(leaf.common_name(), Some(id));
    assert!(!leaf.is_ca());
    let dir = tempfile::tempdir().unwrap();
    let leaf_path = dir.path().join("leaf.pem");
    let intermediate_path = dir.path().join("intermediate.pem");
    std::fs::write(&leaf_path, &pems[0]).unwrap();
    std::fs::write(&intermediate_path, &pems[1]).unwrap();
    // The root the server sent is the one in its CA bundle.
    let bundle = std::fs::read_to_string(s.ca_bundle()).unwrap();
    let root_der = B64.decode(chain_b64[2].as_str().unwrap()).unwrap();
    let bundle_ders: Vec<Vec<u8>> = bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .filter_map(|block| zerotouch_attestation::x509::parse_certificate(block).ok())
        .map(|c| c.der().to_vec())
        .collect();
    assert!(
        bundle_ders.contains(&root_der),
        "the issued root is not in the CA bundle"
    );
    let output = Command::new("openssl")
        .arg("verify")
        .args(["-purpose", "sslclient", "-CAfile"])
        .arg(s.ca_bundle())
        .arg("-untrusted")
        .arg(&intermediate_path)
        .arg(&leaf_path)
        .output()
        .expect("openssl runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim_end().ends_with("OK"),
        "openssl verify: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let (status, device, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["authentication"]["type"], "certificateAuthority");
    let client = device_client(s, &pems[0], &[&pems[1]], key_pem);
    let (status, body, _) = send(
        client
            .post(s.url(&format!("/devices/{id}/messages/events")))
            .body("hello with an issued certificate"),
    );
    assert_eq!(
        status, 204,
        "hub telemetry with the issued certificate: {body}"
    );
}

/// §1.4–§1.5 (2025-07-01-preview): a symmetric-key device sends a CSR and gets a certificate
/// chain from the service CA on the operation response, which the hub then accepts.
#[test]
fn csr_issues_a_certificate_the_hub_accepts() {
    each_backend(|s| {
        let id = "csr-dev-01";
        let (primary, _) = enroll_symmetric(s, id, json!({}));
        let token = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 2400);
        let (csr, key) = pki::csr(id);
        let accepted = register(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id, "csr": B64.encode(&csr)}),
        );
        let operation_id = assert_accepted(&accepted, "register with csr");
        let polled = poll(s, &s.client, id, &operation_id, Some(&token));
        let state = assert_assigned(s, &polled, id, &operation_id);
        let chain = state["issuedCertificateChain"]
            .as_array()
            .unwrap_or_else(|| {
                panic!("the operation response has no registrationState.issuedCertificateChain: {state}")
            })
            .clone();
        check_issued_certificate(s, id, &chain, &key.serialize_pem());
        // Never on the status lookup.
        let (status, looked_up, _) = send(
            c_sdk(s.dps_request(&s.client, Method::POST, &status_path(s, id), Some(&token)))
                .body(json!({"registrationId": id}).to_string()),
        );
        assert_eq!(status, 200, "{looked_up}");
        assert!(
            looked_up.get("issuedCertificateChain").is_none(),
            "{looked_up}"
        );
    });
}

/// Bad CSRs are 400 naming the field, store nothing; `csr` on a status lookup is 400.
#[test]
fn bad_csrs_are_refused() {
    each_backend(|s| {
        let id = "csr-bad-01";
        let (primary, _) = enroll_symmetric(s, id, json!({}));
        let token = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 2400);

        let (wrong_cn, _) = pki::csr("somebody-else");
        let response = register(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id, "csr": B64.encode(&wrong_cn)}),
        );
        assert_error(&response, 400, 400_004, "CSR CN differs");
        assert_eq!(response.1["info"]["field"], "csr");

        let (mut corrupted, _) = pki::csr(id);
        let at = corrupted.len() - 3;
        corrupted[at] ^= 0x5a;
        let response = register(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id, "csr": B64.encode(&corrupted)}),
        );
        assert_error(&response, 400, 400_004, "CSR signature corrupted");
        assert_eq!(response.1["info"]["field"], "csr");

        let response = register(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id, "csr": "not base64 at all!"}),
        );
        assert_error(&response, 400, 400_004, "CSR not base64");
        assert_nothing_stored(s, id);

        // On the status lookup `csr` is forbidden, even once registered.
        register_and_poll(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id}),
        );
        let (good, _) = pki::csr(id);
        let response = send(
            c_sdk(s.dps_request(&s.client, Method::POST, &status_path(s, id), Some(&token)))
                .body(json!({"registrationId": id, "csr": B64.encode(&good)}).to_string()),
        );
        assert!(response.0 == 400, "{:?}", response.1);
        assert_eq!(response.1["info"]["field"], "csr", "{}", response.1);
        assert_error(&response, 400, 400_007, "csr on the status lookup");
    });
}

/// One device registering 8 times at once: every register is answered (202, or a retryable
/// 503), and there is exactly one hub identity and one registration record afterwards.
#[test]
fn concurrent_registrations_of_one_device_converge() {
    each_backend(|s| {
        let group_key = group_symmetric(s, "burst", json!({}));
        let mut lost = Vec::new();
        let mut total = 0;
        for (id, key, group) in [
            (
                "burst-individual",
                enroll_symmetric(s, "burst-individual", json!({})).0,
                None,
            ),
            (
                "burst-member",
                symmetric_key::derive_device_key(&group_key, "burst-member").unwrap(),
                Some("burst"),
            ),
        ] {
            let token = c_sdk_device_sas(&s.id_scope, id, &key, now() + 2400);
            let barrier = Barrier::new(8);
            let results: Vec<(u16, Value, HeaderMap)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        let (token, barrier) = (&token, &barrier);
                        scope.spawn(move || {
                            barrier.wait();
                            register(
                                s,
                                &s.client,
                                id,
                                Some(token),
                                &json!({"registrationId": id}),
                            )
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let accepted: Vec<String> = results
                .iter()
                .filter(|r| r.0 == 202)
                .map(|r| assert_accepted(r, id))
                .collect();
            // Retryable refusals: 503 (identity changed concurrently) or 429 (throttled).
            let unavailable: Vec<_> = results
                .iter()
                .filter(|r| r.0 == 503 || r.0 == 429)
                .collect();
            for r in &unavailable {
                let code = if r.0 == 503 { 503_001 } else { 429_001 };
                assert_error(&(r.0, r.1.clone(), r.2.clone()), r.0, code, id);
                assert!(
                    r.2.contains_key("retry-after"),
                    "{id}: {} without retry-after",
                    r.0
                );
            }
            let other: Vec<_> = results
                .iter()
                .filter(|r| r.0 != 202 && r.0 != 503 && r.0 != 429)
                .map(|r| (r.0, r.1.clone()))
                .collect();
            assert!(other.is_empty(), "{id}: unexpected answers {other:?}");
            eprintln!(
                "{id}: {} accepted, {} retryable 503/429",
                accepted.len(),
                unavailable.len()
            );
            assert!(!accepted.is_empty(), "{id}: no register succeeded");

            // One identity, one record.
            let (status, device, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
            assert_eq!(status, 200, "{device}");
            assert_eq!(device["authentication"]["symmetricKey"]["primaryKey"], key);
            let (status, record, _) = send(s.request(Method::GET, &format!("/registrations/{id}")));
            assert_eq!(status, 200, "{record}");
            assert_eq!(record["status"], "assigned");
            if let Some(group) = group {
                let (status, members, _) =
                    send(s.request(Method::POST, &format!("/registrations/{group}/query")));
                assert_eq!(status, 200, "{members}");
                assert_eq!(members.as_array().unwrap().len(), 1, "{members}");
            }
            // Every device that was told 202 + operationId can poll that operation to its
            // outcome (§1.1: 200 when terminal); a 404 here fails the C SDK (any other 4xx is
            // fatal) although the device is assigned.
            let before = lost.len();
            for operation_id in &accepted {
                let polled = poll(s, &s.client, id, operation_id, Some(&token));
                match polled.0 {
                    200 => {
                        assert_assigned(s, &polled, id, operation_id);
                    }
                    other => lost.push(format!("{id} {operation_id}: {other} {}", polled.1)),
                }
            }
            eprintln!(
                "{id}: {} of {} accepted operations pollable afterwards",
                accepted.len() - (lost.len() - before),
                accepted.len()
            );
            total += accepted.len();
        }
        let (status, devices, _) = send(
            s.hub_request(Method::POST, "/devices/query")
                .json(&json!({"query": "SELECT * FROM devices"})),
        );
        assert_eq!(status, 200, "{devices}");
        let mut ids: Vec<&str> = devices
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["deviceId"].as_str())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, ["burst-individual", "burst-member"], "{devices}");
        assert!(
            lost.is_empty(),
            "{} of {total} accepted operations cannot be polled: {lost:#?}",
            lost.len()
        );
    });
}

/// A failed registration (here 400208: the enrollment names no linked hub) is kept as DPS keeps
/// it: its operation can be polled (200 `failed` with the real errorCode, after a restart too),
/// the management API shows the failed state, and an assigned device that fails to re-register
/// stays assigned where it was. A disabled enrollment's operation polls as `disabled`.
#[test]
fn failed_registrations_are_kept_and_their_operations_polled() {
    for backend in backends() {
        let mut server = TestServer::start(backend);
        let s = &server;
        let id = "fails-first";
        let (key, _) = enroll_symmetric(s, id, json!({"iotHubs": ["elsewhere.example.com"]}));
        let sas = c_sdk_device_sas(&s.id_scope, id, &key, now() + 3600);
        let (status, failed, _) =
            register(s, &s.client, id, Some(&sas), &json!({"registrationId": id}));
        assert_eq!(status, 200, "{failed}");
        assert_eq!(failed["status"], "failed", "{failed}");
        assert_eq!(
            failed["registrationState"]["errorCode"], 400_208,
            "{failed}"
        );
        let operation_id = failed["operationId"]
            .as_str()
            .expect("operationId")
            .to_string();
        let check = |s: &TestServer| {
            let (status, polled, _) = poll(s, &s.client, id, &operation_id, Some(&sas));
            assert_eq!(
                status, 200,
                "the failed operation must stay pollable: {polled}"
            );
            assert_eq!(polled["status"], "failed", "{polled}");
            let state = &polled["registrationState"];
            assert_eq!(state["status"], "failed", "{polled}");
            assert_eq!(state["errorCode"], 400_208, "{polled}");
            assert!(
                state["errorMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("no hub")),
                "{polled}"
            );
            let (status, record, _) = send(s.request(Method::GET, &format!("/registrations/{id}")));
            assert_eq!(status, 200, "{record}");
            assert_eq!(record["status"], "failed", "{record}");
            assert_eq!(record["errorCode"], 400_208, "{record}");
            for field in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
                assert!(record[field].is_string(), "no {field}: {record}");
            }
            assert!(record.get("operationIds").is_none(), "{record}");
        };
        check(s);
        // The record is in the database, not in this process.
        server.restart();
        let s = &server;
        check(s);

        // Fixed enrollment: the next registration is an initial assignment.
        let (status, enrollment, _) = send(s.request(Method::GET, &format!("/enrollments/{id}")));
        assert_eq!(status, 200);
        let etag = enrollment["etag"].as_str().expect("etag").to_string();
        let mut fixed = enrollment.clone();
        fixed.as_object_mut().expect("object").remove("iotHubs");
        fixed["attestation"]["symmetricKey"] = json!({"primaryKey": key});
        let (status, body, _) = send(
            s.request(Method::PUT, &format!("/enrollments/{id}"))
                .header("If-Match", etag)
                .json(&fixed),
        );
        assert_eq!(status, 200, "{body}");
        let state = register_and_poll(s, &s.client, id, Some(&sas), &json!({"registrationId": id}));
        assert_eq!(state["substatus"], "initialAssignment", "{state}");
        let hub = state["assignedHub"].clone();

        // An assigned device whose re-registration fails keeps its assignment in the record,
        // and the next success migrates it rather than starting over.
        let (_, enrollment, _) = send(s.request(Method::GET, &format!("/enrollments/{id}")));
        let mut broken = enrollment.clone();
        broken["iotHubs"] = json!(["elsewhere.example.com"]);
        broken["attestation"]["symmetricKey"] = json!({"primaryKey": key});
        let (status, body, _) = send(
            s.request(Method::PUT, &format!("/enrollments/{id}"))
                .header("If-Match", enrollment["etag"].as_str().expect("etag"))
                .json(&broken),
        );
        assert_eq!(status, 200, "{body}");
        let (status, failed, _) =
            register(s, &s.client, id, Some(&sas), &json!({"registrationId": id}));
        assert_eq!(
            (status, failed["status"].clone()),
            (200, json!("failed")),
            "{failed}"
        );
        let (_, record, _) = send(s.request(Method::GET, &format!("/registrations/{id}")));
        assert_eq!(record["status"], "failed", "{record}");
        assert_eq!(record["assignedHub"], hub, "{record}");
        assert_eq!(record["deviceId"], id, "{record}");
        let (status, device, _) = send(s.hub_request(Method::GET, &format!("/devices/{id}")));
        assert_eq!(status, 200, "the device keeps its hub identity: {device}");
        let (_, enrollment, _) = send(s.request(Method::GET, &format!("/enrollments/{id}")));
        let (status, _, _) = send(
            s.request(Method::PUT, &format!("/enrollments/{id}"))
                .header("If-Match", enrollment["etag"].as_str().expect("etag"))
                .json(&fixed),
        );
        assert_eq!(status, 200);
        let state = register_and_poll(s, &s.client, id, Some(&sas), &json!({"registrationId": id}));
        assert_eq!(state["substatus"], "deviceDataMigrated", "{state}");

        // A disabled enrollment: the register answers `disabled`, and so does its poll.
        let off = "disabled-one";
        let (key, _) = enroll_symmetric(s, off, json!({"provisioningStatus": "disabled"}));
        let sas = c_sdk_device_sas(&s.id_scope, off, &key, now() + 3600);
        let (status, answer, _) = register(
            s,
            &s.client,
            off,
            Some(&sas),
            &json!({"registrationId": off}),
        );
        assert_eq!(
            (status, answer["status"].clone()),
            (200, json!("disabled")),
            "{answer}"
        );
        let operation_id = answer["operationId"].as_str().expect("operationId");
        let (status, polled, _) = poll(s, &s.client, off, operation_id, Some(&sas));
        assert_eq!(
            (status, polled["status"].clone()),
            (200, json!("disabled")),
            "{polled}"
        );
        assert_eq!(
            polled["registrationState"]["errorCode"], 401_006,
            "{polled}"
        );
        assert_nothing_stored(s, off);
    }
}

/// An HTTPS register is answered 202 however fast it was, and its assigned outcome is kept for
/// the poll that repeats its credential (decision 50). Only that exact credential gets it, once;
/// any other poll attests as before.
#[test]
fn a_poll_repeating_the_register_credential_gets_the_kept_outcome_once() {
    each_backend(|s| {
        let id = "kept-poll-01";
        let (primary, secondary) = enroll_symmetric(s, id, json!({}));
        let token = c_sdk_device_sas(&s.id_scope, id, &primary, now() + 3600);
        let accepted = register(
            s,
            &s.client,
            id,
            Some(&token),
            &json!({"registrationId": id}),
        );
        let operation_id = assert_accepted(&accepted, "register");

        // A token signed with a key the enrollment does not have: refused, not answered.
        let wrong = c_sdk_device_sas(&s.id_scope, id, &B64.encode([7u8; 32]), now() + 3600);
        let refused = poll(s, &s.client, id, &operation_id, Some(&wrong));
        assert_error(&refused, 401, 401_002, "a poll with a foreign key");
        // The secondary key attests in full and reads the record.
        let other = c_sdk_device_sas(&s.id_scope, id, &secondary, now() + 3600);
        let polled = poll(s, &s.client, id, &operation_id, Some(&other));
        let by_record = assert_assigned(s, &polled, id, &operation_id);

        // Disabled after the assignment: the registering token still gets what the operation
        // did, once; the next poll attests against the disabled enrollment.
        let (_, enrollment, _) = send(s.request(Method::GET, &format!("/enrollments/{id}")));
        let mut disabled = enrollment.clone();
        disabled["provisioningStatus"] = json!("disabled");
        let (status, body, _) = send(
            s.request(Method::PUT, &format!("/enrollments/{id}"))
                .header("If-Match", enrollment["etag"].as_str().expect("etag"))
                .json(&disabled),
        );
        assert_eq!(status, 200, "{body}");
        let polled = poll(s, &s.client, id, &operation_id, Some(&token));
        let kept = assert_assigned(s, &polled, id, &operation_id);
        assert_eq!(kept, by_record, "the kept outcome is the recorded one");
        let (status, again, _) = poll(s, &s.client, id, &operation_id, Some(&token));
        assert_eq!(
            (status, again["status"].clone()),
            (200, json!("disabled")),
            "{again}"
        );
    });
}
