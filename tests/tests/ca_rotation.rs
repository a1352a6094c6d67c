//! Rotating the issuing intermediate (`zerotouch ca rotate-intermediate`, then
//! `retire-intermediate`), on SQLite and PostgreSQL: during the overlap a device certificate
//! from the old intermediate still connects to the hub (HTTPS and MQTT) and registers with DPS,
//! new certificates come from the new intermediate, the server certificate is re-issued from it;
//! after retirement the old certificate is refused everywhere.

use std::io::{Read, Write};
use std::net::TcpStream;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::Method;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use zerotouch_service::pki::rotation;
use zerotouch_service::time::now_unix as now;
use zerotouch_tests::{TestServer, backends, c_sdk_device_sas, client_trusting, pki, send};

/// `PUT …/register` with `body`, polled until assigned; the registrationState.
fn register_and_poll(s: &TestServer, client: &Client, id: &str, sas: Option<&str>) -> Value {
    s.register_and_poll(client, id, sas, &json!({"registrationId": id}))
}

/// A symmetric-key device registers with a CSR: (leaf + intermediate PEM, key PEM).
fn certificate_by_csr(s: &TestServer, id: &str) -> (String, String) {
    let (status, body, _) = send(
        s.request(Method::PUT, &format!("/enrollments/{id}"))
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{body}");
    let key = body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let token = c_sdk_device_sas(&s.id_scope, id, &key, now() + 600);
    let (csr, device_key) = pki::csr(id);
    let state = s.register_and_poll(
        &s.client,
        id,
        Some(&token),
        &json!({"registrationId": id, "csr": B64.encode(&csr)}),
    );
    let chain: String = state["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no issuedCertificateChain: {state}"))
        .iter()
        .take(2)
        .map(|c| pki::pem_of_der(&B64.decode(c.as_str().unwrap()).unwrap()))
        .collect();
    (chain, device_key.serialize_pem())
}

fn issuer_cn(chain_pem: &str) -> String {
    let cert = openssl::x509::X509::from_pem(chain_pem.as_bytes()).unwrap();
    let issuer = cert
        .issuer_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .as_slice()
        .to_vec();
    String::from_utf8(issuer).unwrap()
}

fn subject_cn_of_intermediate(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let cert = openssl::x509::X509::from_pem(text.as_bytes()).unwrap();
    let cn = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .as_slice()
        .to_vec();
    String::from_utf8(cn).unwrap()
}

fn telemetry_status(s: &TestServer, id: &str, chain: &str, key: &str) -> u16 {
    let client = client_trusting(&s.ca_bundle(), Some((chain, key)));
    send(
        client
            .post(s.url(&format!("/devices/{id}/messages/events")))
            .body("hello"),
    )
    .0
}

/// An MQTT CONNECT over TLS with a client certificate: the CONNACK return code.
fn mqtt_connack(s: &TestServer, device_id: &str, chain_pem: &str, key_pem: &str) -> u8 {
    use openssl::ssl::{SslConnector, SslMethod};
    let mut builder = SslConnector::builder(SslMethod::tls_client()).unwrap();
    builder.set_ca_file(s.ca_bundle()).unwrap();
    let mut certs = openssl::x509::X509::stack_from_pem(chain_pem.as_bytes()).unwrap();
    builder.set_certificate(&certs.remove(0)).unwrap();
    for c in certs {
        builder.add_extra_chain_cert(c).unwrap();
    }
    builder
        .set_private_key(&openssl::pkey::PKey::private_key_from_pem(key_pem.as_bytes()).unwrap())
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", s.mqtt_port())).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut tls = builder.build().connect("localhost", tcp).unwrap();
    let username = format!("localhost/{device_id}/?api-version=2021-04-12");
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 60];
    for field in [device_id, username.as_str()] {
        variable.extend_from_slice(&(field.len() as u16).to_be_bytes());
        variable.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend(variable);
    tls.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20, "{connack:?}");
    connack[3]
}

fn x509_register_status(s: &TestServer, id: &str, chain: &str, key: &str) -> (u16, Value) {
    let device = client_trusting(&s.ca_bundle(), Some((chain, key)));
    let path = format!("/{}/registrations/{id}/register", s.id_scope);
    let (status, body, _) = send(
        s.dps_request(&device, Method::PUT, &path, None)
            .header("Content-Type", "application/json")
            .body(json!({"registrationId": id}).to_string()),
    );
    (status, body)
}

fn bundle_len(s: &TestServer) -> usize {
    let text = std::fs::read_to_string(s.ca_bundle()).unwrap();
    openssl::x509::X509::stack_from_pem(text.as_bytes())
        .unwrap()
        .len()
}

#[test]
fn rotate_overlap_and_retire_the_intermediate() {
    for backend in backends() {
        eprintln!("--- {backend:?}");
        let mut s = TestServer::start(backend);
        let paths = s.running().bound.instance.paths.clone();
        let old_intermediate = subject_cn_of_intermediate(&paths.intermediate_cert);

        // Groups on our own root admit certificates from either intermediate.
        let root = std::fs::read_to_string(&paths.root_cert).unwrap();
        let (status, body, _) = send(
            s.request(Method::PUT, "/certificates/own-root")
                .json(&json!({"certificate": root, "isVerified": true})),
        );
        assert_eq!(status, 200, "{body}");
        let (status, body, _) = send(
            s.request(Method::PUT, "/enrollmentGroups/own-root-group").json(&json!({
                "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "own-root"}}}
            })),
        );
        assert_eq!(status, 200, "{body}");

        let old_id = "rot-old";
        let (old_chain, old_key) = certificate_by_csr(&s, old_id);
        assert_eq!(issuer_cn(&old_chain), old_intermediate);
        assert_eq!(telemetry_status(&s, old_id, &old_chain, &old_key), 204);
        assert_eq!(bundle_len(&s), 2);

        // Rotate (as `zerotouch ca rotate-intermediate` does), then restart.
        let rotated = rotation::rotate_intermediate(&s.settings).unwrap();
        assert!(
            rotated["current"]["subject"]
                .as_str()
                .unwrap()
                .contains("generation 2"),
            "{rotated}"
        );
        s.restart();
        let new_intermediate = subject_cn_of_intermediate(&paths.intermediate_cert);
        assert_ne!(new_intermediate, old_intermediate);
        assert_eq!(bundle_len(&s), 3, "root, new and previous intermediate");
        // The server certificate now comes from the new intermediate (and clients that trust
        // the bundle connect: `s.client` was rebuilt from it).
        let chain = std::fs::read_to_string(&paths.server_chain).unwrap();
        assert_eq!(issuer_cn(&chain), new_intermediate);
        let (status, _, _) = send(s.client.get(s.url("/healthz")));
        assert_eq!(status, 200);

        // Overlap: the old certificate still connects and registers.
        assert_eq!(telemetry_status(&s, old_id, &old_chain, &old_key), 204);
        assert_eq!(mqtt_connack(&s, old_id, &old_chain, &old_key), 0);
        let device = client_trusting(&s.ca_bundle(), Some((&old_chain, &old_key)));
        let state = register_and_poll(&s, &device, old_id, None);
        assert_eq!(state["status"], "assigned", "{state}");

        // New certificates come from the new intermediate, and work too.
        let new_id = "rot-new";
        let (new_chain, new_key) = certificate_by_csr(&s, new_id);
        assert_eq!(issuer_cn(&new_chain), new_intermediate);
        assert_eq!(telemetry_status(&s, new_id, &new_chain, &new_key), 204);
        assert_eq!(mqtt_connack(&s, new_id, &new_chain, &new_key), 0);

        // Retire the old intermediate, then restart.
        let retired = rotation::retire_intermediate(&s.settings).unwrap();
        assert_eq!(retired["retired"][0]["revoked"], 1, "{retired}");
        s.restart();
        assert_eq!(bundle_len(&s), 2);
        assert!(!paths.previous_intermediates.join("x").exists());
        assert_eq!(
            std::fs::read_dir(&paths.retired_intermediates)
                .unwrap()
                .count(),
            1
        );

        // The old certificate is refused everywhere; the new one still works.
        assert_eq!(telemetry_status(&s, old_id, &old_chain, &old_key), 401);
        assert_eq!(mqtt_connack(&s, old_id, &old_chain, &old_key), 5);
        let (status, body) = x509_register_status(&s, old_id, &old_chain, &old_key);
        assert_eq!(
            (status, body["errorCode"].as_u64()),
            (401, Some(401_005)),
            "{body}"
        );
        assert_eq!(telemetry_status(&s, new_id, &new_chain, &new_key), 204);
        let (status, record, _) = send(s.request(
            Method::GET,
            &format!("/certificates/issued?registrationId={old_id}"),
        ));
        assert_eq!(status, 200, "{record}");
        assert_eq!(record[0]["reason"], "cessationOfOperation", "{record}");

        // A second retire has nothing to do.
        assert!(rotation::retire_intermediate(&s.settings).is_err());
    }
}

#[test]
fn rotation_needs_the_root_key() {
    let s = TestServer::start(zerotouch_tests::Backend::Sqlite);
    let paths = s.running().bound.instance.paths.clone();
    let dir = tempfile::tempdir().unwrap();
    std::fs::rename(&paths.root_key, dir.path().join("root.key")).unwrap();
    let err = format!(
        "{:#}",
        rotation::rotate_intermediate(&s.settings).unwrap_err()
    );
    assert!(err.contains("root.key is not present"), "{err}");
    assert!(!paths.previous_intermediates.exists());
}
