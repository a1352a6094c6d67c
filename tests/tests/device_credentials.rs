//! Device credentials that must not work: a certificate whose extended key usage allows only
//! server authentication, on every path a device presents one (the hub over MQTT and HTTPS,
//! DPS, EST).

use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_tests::mqtt::{self, ConnectFailure, Login};
use zerotouch_tests::{Backend, TestServer, backends, client_trusting, pki, send};

fn sha1_thumbprint(cert_pem: &str) -> String {
    let cert = openssl::x509::X509::from_pem(cert_pem.as_bytes()).expect("cert");
    hex::encode(
        cert.digest(openssl::hash::MessageDigest::sha1())
            .expect("digest"),
    )
}

/// HTTPS telemetry with the certificate as TLS client identity; returns the status.
fn https_telemetry(s: &TestServer, device_id: &str, (cert, key): (&str, &str)) -> u16 {
    let client = client_trusting(&s.ca_bundle(), Some((cert, key)));
    let (status, _, _) = send(
        client
            .post(s.url(&format!("/devices/{device_id}/messages/events")))
            .body("hello"),
    );
    status
}

/// An MQTT CONNECT with the certificate; Ok if the hub accepted it.
fn mqtt_connect(
    s: &TestServer,
    device_id: &str,
    (cert, key): (&str, &str),
) -> Result<(), ConnectFailure> {
    let username = mqtt::hub_username(device_id);
    mqtt::connect(
        s.mqtt_port(),
        &s.ca_bundle(),
        &Login {
            client_id: device_id,
            username: &username,
            password: None,
            identity: Some((cert, key)),
            clean_session: true,
        },
    )
    .map(mqtt::Device::disconnect)
}

#[test]
fn the_hub_refuses_a_server_only_certificate_over_mqtt_and_https() {
    let s = TestServer::start(Backend::Sqlite);
    let ca = pki::TestCa::new("fleet CA");
    let (status, body, _) = send(
        s.request(Method::PUT, "/certificates/fleet")
            .json(&json!({"certificate": ca.cert_pem, "isVerified": true})),
    );
    assert_eq!(status, 200, "{body}");

    for (eku, allowed) in [(ServerAuth, false), (ClientAuth, true)] {
        // A certificateAuthority device: CA-signed, CN = device id.
        let device_id = format!("ca-{eku:?}").to_lowercase();
        let (status, body, _) = send(
            s.hub_request(Method::PUT, &format!("/devices/{device_id}"))
                .json(&json!({"deviceId": device_id,
                              "authentication": {"type": "certificateAuthority"}})),
        );
        assert_eq!(status, 200, "{body}");
        let (cert, key) = ca.issue_with_eku(&device_id, vec![eku.clone()]);
        let expected = if allowed { 204 } else { 401 };
        assert_eq!(
            https_telemetry(&s, &device_id, (&cert, &key)),
            expected,
            "HTTPS, CA-signed, {eku:?}"
        );
        assert_eq!(
            mqtt_connect(&s, &device_id, (&cert, &key)).is_ok(),
            allowed,
            "MQTT, CA-signed, {eku:?}"
        );

        // A selfSigned device: enrolled by thumbprint.
        let device_id = format!("self-{eku:?}").to_lowercase();
        let signer = pki::TestCa::new(&device_id);
        let (cert, key) = signer.issue_with_eku(&device_id, vec![eku.clone()]);
        let thumbprint = sha1_thumbprint(&cert);
        let (status, body, _) = send(
            s.hub_request(Method::PUT, &format!("/devices/{device_id}"))
                .json(&json!({"deviceId": device_id, "authentication": {
                    "type": "selfSigned",
                    "x509Thumbprint": {"primaryThumbprint": thumbprint,
                                       "secondaryThumbprint": thumbprint}}})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            https_telemetry(&s, &device_id, (&cert, &key)),
            expected,
            "HTTPS, self-signed, {eku:?}"
        );
        let refused = mqtt_connect(&s, &device_id, (&cert, &key));
        assert_eq!(
            refused.is_ok(),
            allowed,
            "MQTT, self-signed, {eku:?}: {refused:?}"
        );
        if !allowed {
            assert!(
                matches!(refused, Err(ConnectFailure::Refused(_))),
                "a CONNACK refusal, not a dropped connection: {refused:?}"
            );
        }
    }

    let (_, metrics, _) = send(
        s.client
            .get(format!("https://localhost:{}/metrics", s.https_port())),
    );
    assert!(
        metrics
            .as_str()
            .is_some_and(|m| m.contains("reason=\"not_for_client_auth\"")),
        "{metrics}"
    );
}

/// DPS and EST apply the same rule to an individual X.509 enrollment.
#[test]
fn dps_and_est_refuse_a_server_only_certificate() {
    let s = TestServer::start(Backend::Sqlite);
    let ca = pki::TestCa::new("device maker");
    let id = "server-only";
    let (cert, key) = ca.issue_with_eku(id, vec![ServerAuth]);
    let (status, body, _) = send(
        s.request(Method::PUT, &format!("/enrollments/{id}"))
            .json(&json!({"attestation": {"type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": cert}}}}})),
    );
    assert_eq!(status, 200, "{body}");
    let client = client_trusting(&s.ca_bundle(), Some((&cert, &key)));

    let (status, body, _) = send(
        s.dps_request(
            &client,
            Method::PUT,
            &format!("/{}/registrations/{id}/register", s.id_scope),
            None,
        )
        .json(&json!({"registrationId": id})),
    );
    assert_eq!(status, 401, "DPS: {body}");

    let (csr, _) = pki::csr(id);
    let (status, body, _) = send(
        client
            .post(format!(
                "https://localhost:{}/.well-known/est/simpleenroll",
                s.https_port()
            ))
            .header("Content-Type", "application/pkcs10")
            .body(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                csr,
            )),
    );
    assert_eq!(status, 401, "EST: {body}");
}

/// A symmetric-key group; returns its primary key.
fn group(s: &TestServer, group_id: &str) -> String {
    let (status, created, _) = send(
        s.request(Method::PUT, &format!("/enrollmentGroups/{group_id}"))
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{created}");
    created["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("primary")
        .to_string()
}

/// Registers over HTTPS with `key` and polls while it is assigning; returns the final status
/// and body (the operation's, or the refusal's).
fn register_https(s: &TestServer, id: &str, key: &str) -> (u16, Value) {
    let sas = s.device_sas(id, key, 3600);
    let (mut status, mut body, _) = send(
        s.dps_request(
            &s.client,
            Method::PUT,
            &format!("/{}/registrations/{id}/register", s.id_scope),
            Some(&sas),
        )
        .json(&json!({ "registrationId": id })),
    );
    for _ in 0..100 {
        if status != 202 && body["status"] != "assigning" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let operation = body["operationId"]
            .as_str()
            .expect("operationId")
            .to_string();
        (status, body, _) = send(s.dps_request(
            &s.client,
            Method::GET,
            &format!("/{}/registrations/{id}/operations/{operation}", s.id_scope),
            Some(&sas),
        ));
    }
    (status, body)
}

/// Registers over DPS's MQTT topics; returns the final status and body.
fn register_mqtt(s: &TestServer, id: &str, key: &str) -> (u16, Value) {
    let sas = s.device_sas(id, key, 3600);
    let username = mqtt::dps_username(&s.id_scope, id);
    let mut device = mqtt::connect(
        s.mqtt_port(),
        &s.ca_bundle(),
        &Login {
            client_id: id,
            username: &username,
            password: Some(&sas),
            identity: None,
            clean_session: true,
        },
    )
    .expect("DPS accepts the derived key at CONNECT");
    let answer = device
        .register(&json!({ "registrationId": id }))
        .expect("answer");
    device.disconnect();
    answer
}

/// Whether the hub lets `device_id` in over MQTT with a SAS signed by `key`.
fn hub_accepts(s: &TestServer, device_id: &str, key: &str) -> bool {
    let now = zerotouch_service::time::now_unix();
    let sas = zerotouch_attestation::symmetric_key::sign(
        &format!("{}/devices/{device_id}", s.host()),
        key,
        now + 600,
        None,
    )
    .expect("sign");
    let username = mqtt::hub_username(device_id);
    mqtt::connect(
        s.mqtt_port(),
        &s.ca_bundle(),
        &Login {
            client_id: device_id,
            username: &username,
            password: Some(&sas),
            identity: None,
            clean_session: true,
        },
    )
    .map(mqtt::Device::disconnect)
    .is_ok()
}

/// The hub identities whose id equals `id` ignoring case.
fn identities_spelled(s: &TestServer, id: &str) -> Vec<String> {
    let (status, devices, _) = send(
        s.hub_request(Method::POST, "/devices/query")
            .json(&json!({"query": "SELECT * FROM devices"})),
    );
    assert_eq!(status, 200, "{devices}");
    devices
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .filter(|d| d.eq_ignore_ascii_case(id))
        .map(String::from)
        .collect()
}

/// Registration ids are case-insensitive. In a group each spelling derives its own key, so a
/// second spelling is a second device: it is refused (409205) over HTTPS and MQTT, and the
/// device that registered first keeps its identity and its key.
#[test]
fn a_second_spelling_never_takes_over_a_registered_id() {
    for backend in backends() {
        eprintln!("--- {backend:?}");
        let s = TestServer::start(backend);
        let group_key = group(&s, "spellings");
        let derive = |id: &str| {
            zerotouch_attestation::symmetric_key::derive_device_key(&group_key, id).expect("key")
        };
        let first_key = derive("Sensor-7");

        let (status, body) = register_https(&s, "Sensor-7", &first_key);
        assert_eq!(
            (status, &body["status"]),
            (200, &json!("assigned")),
            "{body}"
        );
        assert_eq!(body["registrationState"]["deviceId"], "Sensor-7", "{body}");

        let (status, body) = register_https(&s, "sensor-7", &derive("sensor-7"));
        assert_eq!(
            (status, &body["errorCode"]),
            (409, &json!(409_205)),
            "HTTPS: {body}"
        );
        let (status, body) = register_mqtt(&s, "SENSOR-7", &derive("SENSOR-7"));
        assert_eq!(
            (status, &body["errorCode"]),
            (409, &json!(409_205)),
            "MQTT: {body}"
        );

        assert_eq!(identities_spelled(&s, "sensor-7"), ["Sensor-7"]);
        assert!(
            hub_accepts(&s, "Sensor-7", &first_key),
            "the first device was locked out"
        );
        let (status, body, _) = send(s.request(Method::GET, "/registrations/sensor-7"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["registrationId"], &body["status"]),
            (&json!("Sensor-7"), &json!("assigned")),
            "{body}"
        );

        // The registered spelling registers again as before, over MQTT too.
        let (status, body) = register_mqtt(&s, "Sensor-7", &first_key);
        assert_eq!(
            (status, &body["status"]),
            (200, &json!("assigned")),
            "{body}"
        );

        // Two spellings racing for a new id: one wins, one identity.
        for round in 0..4 {
            let (upper, lower) = (format!("Race-{round}"), format!("race-{round}"));
            let barrier = std::sync::Barrier::new(2);
            let outcomes: Vec<(u16, Value)> = std::thread::scope(|scope| {
                let threads: Vec<_> = [&upper, &lower]
                    .into_iter()
                    .map(|id| {
                        let (s, barrier, key) = (&s, &barrier, derive(id));
                        scope.spawn(move || {
                            barrier.wait();
                            register_https(s, id, &key)
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().expect("thread"))
                    .collect()
            });
            let won: Vec<_> = outcomes
                .iter()
                .filter(|(status, body)| *status == 200 && body["status"] == "assigned")
                .collect();
            assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
            assert!(
                outcomes
                    .iter()
                    .any(|(status, body)| *status == 409 && body["errorCode"] == 409_205),
                "round {round}: {outcomes:?}"
            );
            let winner = won[0].1["registrationState"]["deviceId"]
                .as_str()
                .expect("deviceId")
                .to_string();
            assert_eq!(identities_spelled(&s, &lower), [winner], "round {round}");
        }
    }
}
