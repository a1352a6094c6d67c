//! Device credentials that must not work: a certificate whose extended key usage allows only
//! server authentication, on every path a device presents one (the hub over MQTT and HTTPS,
//! DPS, EST).

use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
use reqwest::Method;
use serde_json::json;
use zerotouch_tests::mqtt::{self, ConnectFailure, Login};
use zerotouch_tests::{Backend, TestServer, client_trusting, pki, send};

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
