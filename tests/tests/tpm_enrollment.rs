//! TPM attestation end to end, with a software TPM (swtpm + tpm2-tools) as the device:
//! register without credentials → 401 with an activation blob → ActivateCredential, Import,
//! Load inside the TPM → re-register with a SAS signed by the TPM → assigned with a fresh blob →
//! connect to the hub over MQTT with a SAS signed inside the TPM and send telemetry.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_tests::swtpm::Swtpm;
use zerotouch_tests::{Backend, TestServer, backends, send};

/// A SAS token whose signature is computed inside the TPM with the imported key.
fn tpm_token(tpm: &Swtpm, resource: &str, key_name: Option<&str>) -> String {
    tpm.sas_token(resource, key_name)
}

fn registration_id(ek_b64: &str) -> String {
    zerotouch_attestation::tpm::parse_endorsement_key(ek_b64)
        .unwrap()
        .registration_id()
}

fn register(
    s: &TestServer,
    id: &str,
    body: &Value,
    token: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = s
        .client
        .put(s.url(&format!("/{}/registrations/{id}/register", s.id_scope)))
        .json(body);
    if let Some(token) = token {
        request = request.header("Authorization", token);
    }
    send(request)
}

fn enroll(s: &TestServer, id: &str, ek: &str) {
    let (status, body, _) = send(s.request(Method::PUT, &format!("/enrollments/{id}")).json(
        &json!({
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}},
            "initialTwin": {"tags": {"tpm": true}},
        }),
    ));
    assert_eq!(status, 200, "{body}");
}

fn record_exists(s: &TestServer, id: &str) -> bool {
    send(s.request(Method::GET, &format!("/registrations/{id}"))).0 == 200
}

#[test]
fn a_software_tpm_registers_and_sends_telemetry() {
    for backend in backends() {
        let tpm = Swtpm::start();
        let (ek, srk) = tpm.device_init();
        let id = registration_id(&ek);
        let s = TestServer::start(backend);
        enroll(&s, &id, &ek);
        let body =
            json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": srk}});

        // 1. No credentials: the challenge.
        let (status, challenge, _) = register(&s, &id, &body, None);
        assert_eq!(status, 401, "{challenge}");
        assert_eq!(challenge["keyName"], "registration");
        assert!(
            challenge.get("status").is_none(),
            "the C SDK reads a body without status as the challenge"
        );
        tpm.device_import(challenge["authenticationKey"].as_str().unwrap());

        // 2. Signed inside the TPM: 202, then assigned with a fresh blob.
        let resource = format!("{}/registrations/{id}", s.id_scope);
        let token = tpm_token(&tpm, &resource, Some("registration"));
        let (status, accepted, _) = register(&s, &id, &body, Some(&token));
        assert_eq!(status, 202, "{accepted}");
        let operation = accepted["operationId"].as_str().unwrap();
        let (status, done, _) = send(
            s.client
                .get(s.url(&format!(
                    "/{}/registrations/{id}/operations/{operation}",
                    s.id_scope
                )))
                .header("Authorization", &token),
        );
        assert_eq!(status, 200, "{done}");
        assert_eq!(done["status"], "assigned", "{done}");
        let state = &done["registrationState"];
        let device_id = state["deviceId"].as_str().unwrap().to_string();
        let fresh = state["tpm"]["authenticationKey"]
            .as_str()
            .expect("a fresh blob");
        assert_ne!(fresh, challenge["authenticationKey"].as_str().unwrap());

        // 3. The challenge is single-use: replaying the signed register is refused.
        let (status, replay, _) = register(&s, &id, &body, Some(&token));
        assert_eq!(
            (status, replay["errorCode"].as_u64()),
            (401, Some(401_002)),
            "{replay}"
        );

        // 4. The fresh key goes into the TPM and signs the hub SAS; MQTT telemetry lands.
        tpm.device_import(fresh);
        let hub_token = tpm_token(&tpm, &format!("localhost/devices/{device_id}"), None);
        publish_over_mqtt(&s, &device_id, &hub_token);
        let (status, page, _) = send(s.hub_request(
            Method::GET,
            &format!("/messages/events?from=0&limit=10&deviceId={device_id}&wait=5"),
        ));
        assert_eq!(status, 200);
        assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
        let (_, twin, _) = send(s.hub_request(Method::GET, &format!("/twins/{device_id}")));
        assert_eq!(twin["tags"]["tpm"], true, "the initial twin was applied");
        drop(tpm);
        eprintln!("--- {backend:?}: TPM device assigned and sent telemetry");
    }
}

fn publish_over_mqtt(s: &TestServer, device_id: &str, token: &str) {
    use rumqttc::tokio_native_tls::native_tls;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tls = native_tls::TlsConnector::builder();
        let pem = std::fs::read(s.ca_bundle()).unwrap();
        for cert in openssl::x509::X509::stack_from_pem(&pem).unwrap() {
            tls.add_root_certificate(
                native_tls::Certificate::from_der(&cert.to_der().unwrap()).unwrap(),
            );
        }
        let mut options = MqttOptions::new(device_id, "localhost", s.mqtt_port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_credentials(
                format!("localhost/{device_id}/?api-version=2019-10-01"),
                token,
            )
            .set_transport(Transport::tls_with_config(
                TlsConfiguration::NativeConnector(tls.build().unwrap()),
            ));
        let (client, mut events) = AsyncClient::new(options, 10);
        client
            .publish(
                format!("devices/{device_id}/messages/events/"),
                QoS::AtLeastOnce,
                false,
                b"from the TPM".to_vec(),
            )
            .await
            .unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                    Ok(Event::Incoming(Packet::ConnAck(ack)))
                        if ack.code != rumqttc::ConnectReturnCode::Success =>
                    {
                        return Err(format!("CONNACK {:?}", ack.code));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await;
        assert_eq!(
            acked,
            Ok(Ok(())),
            "the TPM-signed SAS connects and the message is acknowledged"
        );
        let _ = client.disconnect().await;
    });
}

#[test]
fn tpm_refusals_store_nothing() {
    let tpm = Swtpm::start();
    let (ek, srk) = tpm.device_init();
    let other = Swtpm::start();
    let (other_ek, other_srk) = other.device_init();
    let id = registration_id(&ek);
    let s = TestServer::start(Backend::Sqlite);
    enroll(&s, &id, &ek);

    // Another TPM's endorsement key: no challenge.
    let wrong = json!({"registrationId": id, "tpm": {"endorsementKey": other_ek, "storageRootKey": other_srk}});
    let (status, err, _) = register(&s, &id, &wrong, None);
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (401, Some(401_002)),
        "{err}"
    );

    // Truncated and oversized TPM2B structures: 400 naming the field.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let ek_bytes = b64.decode(&ek).unwrap();
    let truncated = b64.encode(&ek_bytes[..ek_bytes.len() - 10]);
    let mut oversized = ek_bytes.clone();
    oversized.extend_from_slice(&[0u8; 64]);
    for bad in [truncated, b64.encode(&oversized), "not base64!".to_string()] {
        let body =
            json!({"registrationId": id, "tpm": {"endorsementKey": bad, "storageRootKey": srk}});
        let (status, err, _) = register(&s, &id, &body, None);
        assert_eq!(
            (status, err["errorCode"].as_u64()),
            (400, Some(400_006)),
            "{err}"
        );
        assert_eq!(err["info"]["field"], "tpm.endorsementKey");
    }

    // An enrollment that pins the SRK refuses another one.
    let pinned = "pinned-srk";
    let (status, body, _) = send(s.request(Method::PUT, &format!("/enrollments/{pinned}")).json(&json!({
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek, "storageRootKey": srk}},
    })));
    assert_eq!(status, 200, "{body}");
    let mismatch = json!({"registrationId": pinned, "tpm": {"endorsementKey": ek, "storageRootKey": other_srk}});
    let (status, err, _) = register(&s, pinned, &mismatch, None);
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (401, Some(401_002)),
        "{err}"
    );

    // A genuine challenge, answered with a signature from another TPM: refused.
    let body = json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let (status, challenge, _) = register(&s, &id, &body, None);
    assert_eq!(status, 401);
    let blob = challenge["authenticationKey"].as_str().unwrap();
    // The blob is bound to the first TPM's EK and SRK: the other TPM cannot import it...
    assert!(other.try_device(&["import", blob]).is_err());
    // ...so it can only sign with a key of its own.
    let own = zerotouch_attestation::tpm::build_activation(
        &zerotouch_attestation::tpm::parse_endorsement_key(&other_ek).unwrap(),
        &zerotouch_attestation::tpm::parse_storage_root_key(&other_srk).unwrap(),
    )
    .unwrap();
    other.device_import(&own.blob_base64());
    let resource = format!("{}/registrations/{id}", s.id_scope);
    let forged = tpm_token(&other, &resource, Some("registration"));
    let (status, err, _) = register(&s, &id, &body, Some(&forged));
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (401, Some(401_002)),
        "{err}"
    );
    assert!(!record_exists(&s, &id), "nothing stored");
}

/// A TPM maker's root, made now, and EK certificates it issues for a TPM's endorsement key.
struct Maker {
    pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl Maker {
    fn new(name: &str) -> Maker {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Maker { pem, params, key }
    }

    fn certify(&self, ek_b64: &str) -> String {
        let ek = zerotouch_attestation::tpm::parse_endorsement_key(ek_b64).unwrap();
        let rsa = openssl::rsa::Rsa::from_public_components(
            openssl::bn::BigNum::from_slice(&ek.modulus).unwrap(),
            openssl::bn::BigNum::from_u32(ek.exponent()).unwrap(),
        )
        .unwrap();
        let spki = openssl::pkey::PKey::from_rsa(rsa)
            .unwrap()
            .public_key_to_der()
            .unwrap();
        let public = rcgen::SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "TPM EK");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        params.signed_by(&public, &issuer).unwrap().pem()
    }
}

/// Runs the challenge, import and signed register; returns the poll answer.
fn full_registration(s: &TestServer, tpm: &Swtpm, id: &str, body: &Value) -> Value {
    let (status, challenge, _) = register(s, id, body, None);
    assert_eq!(status, 401, "{challenge}");
    tpm.device_import(challenge["authenticationKey"].as_str().unwrap());
    let token = tpm_token(
        tpm,
        &format!("{}/registrations/{id}", s.id_scope),
        Some("registration"),
    );
    let (status, accepted, _) = register(s, id, body, Some(&token));
    assert_eq!(status, 202, "{accepted}");
    let operation = accepted["operationId"].as_str().unwrap();
    send(
        s.client
            .get(s.url(&format!(
                "/{}/registrations/{id}/operations/{operation}",
                s.id_scope
            )))
            .header("Authorization", &token),
    )
    .1
}

#[test]
fn tpm_groups_admit_tpms_whose_ek_certificate_chains_to_their_root() {
    for backend in backends() {
        let maker = Maker::new("TPM Maker Root");
        let s = TestServer::start(backend);
        let (status, group, _) = send(s.request(Method::PUT, "/enrollmentGroups/fleet-tpms").json(&json!({
            "attestation": {"type": "tpm", "tpm": {"rootCertificates": {"primary": {"certificate": maker.pem}}}},
            "initialTwin": {"tags": {"fleet": "tpm"}},
        })));
        assert_eq!(status, 200, "{group}");

        let tpm = Swtpm::start();
        let (ek, srk) = tpm.device_init();
        let id = registration_id(&ek);
        let body = json!({"registrationId": id, "tpm": {
            "endorsementKey": ek, "storageRootKey": srk, "endorsementKeyCertificate": maker.certify(&ek),
        }});
        let done = full_registration(&s, &tpm, &id, &body);
        assert_eq!(done["status"], "assigned", "{done}");
        let members = send(s.request(Method::POST, "/registrations/fleet-tpms/query")).1;
        assert_eq!(members.as_array().unwrap().len(), 1, "{members}");
        let device_id = done["registrationState"]["deviceId"].as_str().unwrap();
        let (_, twin, _) = send(s.hub_request(Method::GET, &format!("/twins/{device_id}")));
        assert_eq!(twin["tags"]["fleet"], "tpm");

        // Refused without a challenge: a certificate from another maker, no certificate, and a
        // registration id other than the EK-derived one.
        let other = Swtpm::start();
        let (other_ek, other_srk) = other.device_init();
        let other_id = registration_id(&other_ek);
        let rogue = Maker::new("Rogue Root");
        for (rid, cert) in [
            (other_id.clone(), Some(rogue.certify(&other_ek))),
            (other_id.clone(), None),
            (
                "not-the-derived-id".to_string(),
                Some(maker.certify(&other_ek)),
            ),
        ] {
            let mut tpm_body = json!({"endorsementKey": other_ek, "storageRootKey": other_srk});
            if let Some(cert) = cert {
                tpm_body["endorsementKeyCertificate"] = json!(cert);
            }
            let (status, err, _) = register(
                &s,
                &rid,
                &json!({"registrationId": rid, "tpm": tpm_body}),
                None,
            );
            assert_eq!(
                (status, err["errorCode"].as_u64()),
                (401, Some(401_002)),
                "{rid}: {err}"
            );
            assert!(err.get("authenticationKey").is_none());
            assert!(!record_exists(&s, &rid));
        }
    }
}

#[test]
fn manufacturer_roots_gate_individual_tpms() {
    let maker = Maker::new("TPM Maker Root");
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("tpm-roots.pem");
    std::fs::write(&roots, &maker.pem).unwrap();
    let s = TestServer::start_with(Backend::Sqlite, |settings| {
        settings.dps.tpm_manufacturer_roots = Some(roots.clone());
    });
    let tpm = Swtpm::start();
    let (ek, srk) = tpm.device_init();
    let id = registration_id(&ek);
    enroll(&s, &id, &ek);
    // With manufacturer roots configured, an individual TPM must show its EK certificate.
    let bare = json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let (status, err, _) = register(&s, &id, &bare, None);
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (401, Some(401_002)),
        "{err}"
    );
    assert!(err.get("authenticationKey").is_none());
    let rogue = Maker::new("Rogue Root");
    let forged = json!({"registrationId": id, "tpm": {
        "endorsementKey": ek, "storageRootKey": srk, "endorsementKeyCertificate": rogue.certify(&ek),
    }});
    let (status, _, _) = register(&s, &id, &forged, None);
    assert_eq!(status, 401);
    let body = json!({"registrationId": id, "tpm": {
        "endorsementKey": ek, "storageRootKey": srk, "endorsementKeyCertificate": maker.certify(&ek),
    }});
    let done = full_registration(&s, &tpm, &id, &body);
    assert_eq!(done["status"], "assigned", "{done}");
}

#[test]
fn an_expired_challenge_is_refused() {
    let s = TestServer::start_with(Backend::Sqlite, |settings| {
        settings.dps.tpm_challenge_seconds = 1;
    });
    let tpm = Swtpm::start();
    let (ek, srk) = tpm.device_init();
    let id = registration_id(&ek);
    enroll(&s, &id, &ek);
    let body = json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let (status, challenge, _) = register(&s, &id, &body, None);
    assert_eq!(status, 401);
    tpm.device_import(challenge["authenticationKey"].as_str().unwrap());
    // The challenge lives 1 s here: answering it 2 s later is refused.
    std::thread::sleep(Duration::from_millis(2100));
    let token = tpm_token(
        &tpm,
        &format!("{}/registrations/{id}", s.id_scope),
        Some("registration"),
    );
    let (status, err, _) = register(&s, &id, &body, Some(&token));
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (401, Some(401_002)),
        "{err}"
    );
    assert!(!record_exists(&s, &id));
}

#[test]
fn keys_the_blob_cannot_be_built_for_are_a_400_not_a_500() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let tpm = Swtpm::start();
    let (ek, srk) = tpm.device_init();
    let s = TestServer::start(Backend::Sqlite);
    // The SRK with its modulus halved in value (top bit cleared): it still parses as RSA-2048,
    // but no RSA-2048 key has it.
    let mut srk_bytes = b64.decode(&srk).unwrap();
    let modulus_start = srk_bytes.len() - 256;
    srk_bytes[modulus_start] &= 0x7f;
    let id = registration_id(&ek);
    enroll(&s, &id, &ek);
    let body = json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": b64.encode(&srk_bytes)}});
    let (status, err, _) = register(&s, &id, &body, None);
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (400, Some(400_006)),
        "{err}"
    );
    assert_eq!(err["info"]["field"], "tpm");
    assert!(!record_exists(&s, &id));

    // The same bad SRK sent only with the signed re-register (after a good challenge) is the
    // device's error too.
    let good = json!({"registrationId": id, "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let (status, challenge, _) = register(&s, &id, &good, None);
    assert_eq!(status, 401);
    tpm.device_import(challenge["authenticationKey"].as_str().unwrap());
    let token = tpm_token(
        &tpm,
        &format!("{}/registrations/{id}", s.id_scope),
        Some("registration"),
    );
    let (status, err, _) = register(&s, &id, &body, Some(&token));
    assert_eq!(
        (status, err["errorCode"].as_u64()),
        (400, Some(400_006)),
        "{err}"
    );
    assert_eq!(err["info"]["field"], "tpm.storageRootKey");
    assert!(!record_exists(&s, &id));
}
