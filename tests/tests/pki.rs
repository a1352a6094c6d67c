//! The PKI lifecycle against a running server, on SQLite and PostgreSQL, checked with real
//! clients: `openssl ocsp` (good, revoked, unknown, nonce), `openssl verify -crl_check` with
//! the downloaded CRL, `curl` + `openssl` for EST, the DPS device API and the hub (HTTPS and a
//! raw MQTT CONNECT over TLS) refusing or dropping a revoked certificate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::Method;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use zerotouch_service::time::now_unix as now;
use zerotouch_tests::{
    TestServer, backends, c_sdk_device_sas, client_trusting, each_backend, pki, send,
};

fn assert_code(response: &(u16, Value, reqwest::header::HeaderMap), status: u16, code: u64) {
    assert_eq!(
        (response.0, response.1["errorCode"].as_u64()),
        (status, Some(code)),
        "{}",
        response.1
    );
}

/// A symmetric-key individual enrollment; returns its primary key.
fn enroll_symmetric(s: &TestServer, id: &str) -> String {
    let (status, body, _) = send(
        s.request(Method::PUT, &format!("/enrollments/{id}"))
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{body}");
    body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("primary key")
        .to_string()
}

/// Registers `id` with a SAS token and a CSR; returns (leaf PEM, intermediate PEM, key PEM).
fn register_with_csr(s: &TestServer, id: &str, key: &str) -> (String, String, String) {
    let token = c_sdk_device_sas(&s.id_scope, id, key, now() + 600);
    let (csr, device_key) = pki::csr(id);
    let body = json!({"registrationId": id, "csr": B64.encode(&csr)});
    let state = s.register_and_poll(&s.client, id, Some(&token), &body);
    let chain: Vec<String> = state["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no issuedCertificateChain: {state}"))
        .iter()
        .map(|c| pki::pem_of_der(&B64.decode(c.as_str().unwrap()).unwrap()))
        .collect();
    (
        chain[0].clone(),
        chain[1].clone(),
        device_key.serialize_pem(),
    )
}

/// The X.509 register of `id` with `client`: the HTTP status and body of the `PUT`.
fn register_x509(
    s: &TestServer,
    client: &Client,
    id: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let path = format!("/{}/registrations/{id}/register", s.id_scope);
    send(
        s.dps_request(client, Method::PUT, &path, None)
            .header("Content-Type", "application/json")
            .body(json!({"registrationId": id}).to_string()),
    )
}

fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn serial_of(pem: &str) -> String {
    let cert = openssl::x509::X509::from_pem(pem.as_bytes()).unwrap();
    cert.serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string()
}

/// Runs `openssl ocsp` for `cert` (a path, or `-serial N`) issued by `issuer`; returns
/// stdout + stderr. With `verify`, the response signature and nonce must check out.
fn openssl_ocsp_with(
    s: &TestServer,
    dir: &Path,
    issuer: &Path,
    cert: &[&std::ffi::OsStr],
    verify: bool,
) -> String {
    let output = Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(issuer)
        .args(cert)
        .args(if verify { &[][..] } else { &["-noverify"][..] })
        .args([
            "-url",
            &format!("https://localhost:{}/ocsp", s.https_port()),
        ])
        .arg("-CAfile")
        .arg(s.ca_bundle())
        .arg("-nonce")
        .arg("-resp_text")
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "openssl ocsp failed: {text}");
    if verify {
        assert!(text.contains("Response verify OK"), "{text}");
        assert!(!text.contains("WARNING: no nonce"), "{text}");
    }
    text
}

fn openssl_ocsp(s: &TestServer, dir: &Path, issuer: &Path, cert: &Path) -> String {
    openssl_ocsp_with(s, dir, issuer, &["-cert".as_ref(), cert.as_os_str()], true)
}

/// The status line `openssl ocsp` prints for `cert` (`good`, `revoked`, `unknown`).
fn ocsp_status(text: &str, cert: &Path) -> String {
    let prefix = format!("{}: ", cert.display());
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no status line in {text}"))
        .trim()
        .to_string()
}

/// `openssl verify -crl_check` with the server's current CRL (PEM); returns (ok, output).
fn verify_with_crl(s: &TestServer, dir: &Path, intermediate: &Path, leaf: &Path) -> (bool, String) {
    let response = s
        .client
        .get(format!(
            "https://localhost:{}/crl?format=pem",
            s.https_port()
        ))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let crl = write(dir, "crl.pem", response.text().unwrap());
    // The DER form is the same CRL.
    let der = s
        .client
        .get(format!("https://localhost:{}/crl", s.https_port()))
        .send()
        .unwrap();
    assert_eq!(
        der.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/pkix-crl")
    );
    let output = Command::new("openssl")
        .args(["verify", "-crl_check", "-CRLfile"])
        .arg(&crl)
        .arg("-CAfile")
        .arg(s.ca_bundle())
        .arg("-untrusted")
        .arg(intermediate)
        .arg(leaf)
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// An MQTT CONNECT as `device_id` over TLS with a client certificate; returns the stream
/// after a CONNACK, or the CONNACK return code if refused.
fn mqtt_connect(
    s: &TestServer,
    device_id: &str,
    chain_pem: &str,
    key_pem: &str,
) -> Result<openssl::ssl::SslStream<TcpStream>, u8> {
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
    let connector = builder.build();
    let tcp = TcpStream::connect(("127.0.0.1", s.mqtt_port())).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut tls = connector.connect("localhost", tcp).unwrap();
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
    match connack[3] {
        0 => Ok(tls),
        code => Err(code),
    }
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

/// Items 1–4 of issue 7: records and audit, OCSP and CRL, revocation through the API and its
/// enforcement at DPS and the hub (refusal and disconnection).
#[test]
fn issued_certificates_are_recorded_checked_and_revoked() {
    each_backend(|s| {
        let dir = tempfile::tempdir().unwrap();
        let id = "pki-dev-01";
        let key = enroll_symmetric(s, id);
        let (leaf, intermediate, device_key) = register_with_csr(s, id, &key);
        let leaf_path = write(dir.path(), "leaf.pem", &leaf);
        let intermediate_path = write(dir.path(), "intermediate.pem", &intermediate);
        let serial = serial_of(&leaf);

        // The certificate points at our CRL and OCSP responder.
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&leaf_path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        let base = format!("https://localhost:{}", s.https_port());
        assert!(text.contains(&format!("URI:{base}/crl")), "{text}");
        assert!(text.contains(&format!("OCSP - URI:{base}/ocsp")), "{text}");

        // Recorded, with its audit event.
        let (status, list, _) = send(s.request(
            Method::GET,
            &format!("/certificates/issued?registrationId={id}"),
        ));
        assert_eq!(status, 200, "{list}");
        let records = list.as_array().unwrap();
        assert_eq!(records.len(), 1, "{list}");
        assert_eq!(records[0]["serial"], serial.as_str());
        assert_eq!(records[0]["status"], "good");
        assert_eq!(records[0]["subject"], format!("CN={id}"));
        let (status, audit, _) = send(s.request(Method::GET, &format!("/audit?serial={serial}")));
        assert_eq!(status, 200, "{audit}");
        assert_eq!(audit.as_array().unwrap().len(), 1, "{audit}");
        assert_eq!(audit[0]["action"], "issue");
        assert_eq!(audit[0]["registrationId"], id);

        // OCSP: good; a foreign certificate: unknown.
        let ocsp = openssl_ocsp(s, dir.path(), &intermediate_path, &leaf_path);
        assert_eq!(ocsp_status(&ocsp, &leaf_path), "good", "{ocsp}");
        let foreign_ca = pki::TestCa::new("Foreign CA");
        let (foreign, _) = foreign_ca.issue(id);
        let foreign_path = write(dir.path(), "foreign.pem", &foreign);
        let foreign_ca_path = write(dir.path(), "foreign-ca.pem", &foreign_ca.cert_pem);
        // (We are not the foreign CA's responder, so openssl cannot accept our signature.)
        let ocsp = openssl_ocsp_with(
            s,
            dir.path(),
            &foreign_ca_path,
            &["-cert".as_ref(), foreign_path.as_os_str()],
            false,
        );
        assert_eq!(ocsp_status(&ocsp, &foreign_path), "unknown", "{ocsp}");
        // Our issuer, a serial we never issued: unknown, signed and verifiable.
        let ocsp = openssl_ocsp_with(
            s,
            dir.path(),
            &intermediate_path,
            &["-serial".as_ref(), "0x0123456789ABCDEF".as_ref()],
            true,
        );
        assert!(ocsp.contains(": unknown"), "{ocsp}");

        // CRL: verifies before revocation.
        let (ok, output) = verify_with_crl(s, dir.path(), &intermediate_path, &leaf_path);
        assert!(ok, "{output}");

        // The hub takes the certificate (HTTPS telemetry, MQTT CONNECT).
        assert_eq!(
            telemetry_status(s, id, &format!("{leaf}{intermediate}"), &device_key),
            204
        );

        // DPS X.509 through a group on our own intermediate: accepted before revocation.
        let (status, body, _) = send(
            s.request(Method::PUT, "/certificates/own-intermediate")
                .json(&json!({"certificate": intermediate, "isVerified": true})),
        );
        assert_eq!(status, 200, "{body}");
        let (status, body, _) = send(
            s.request(Method::PUT, "/enrollmentGroups/own-ca-group").json(&json!({
                "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "own-intermediate"}}}
            })),
        );
        assert_eq!(status, 200, "{body}");
        let device = client_trusting(
            &s.ca_bundle(),
            Some((&format!("{leaf}{intermediate}"), &device_key)),
        );
        let state = s.register_and_poll(&device, id, None, &json!({"registrationId": id}));
        assert_eq!(state["status"], "assigned");
        // Presenting this certificate with a new CSR is a renewal: the default window (from
        // 2/3 of the lifetime) has not opened, so DPS refuses it as EST would, issuing nothing.
        let issued_before = issued_count(s);
        let (renewal_csr, _) = pki::csr(id);
        let response = send(
            s.dps_request(
                &device,
                Method::PUT,
                &format!("/{}/registrations/{id}/register", s.id_scope),
                None,
            )
            .header("Content-Type", "application/json")
            .body(json!({"registrationId": id, "csr": B64.encode(&renewal_csr)}).to_string()),
        );
        assert_code(&response, 403, 403_002);
        assert_eq!(issued_count(s), issued_before);
        let mut live = mqtt_connect(s, id, &format!("{leaf}{intermediate}"), &device_key)
            .expect("CONNACK 0 before revocation");
        // A registration assigned now whose poll comes after the revocation (its outcome is
        // kept in memory for that poll, decision 50): the poll is refused too.
        let pending = register_x509(s, &device, id);
        assert_eq!(pending.0, 202, "{}", pending.1);
        let pending_operation = pending.1["operationId"].as_str().unwrap().to_string();

        // Bad reason: 400; unknown serial: 404207.
        let revoke_path = format!("/certificates/issued/{serial}/revoke");
        let response = send(
            s.request(Method::POST, &revoke_path)
                .json(&json!({"reason": "bored"})),
        );
        assert_code(&response, 400, 400_007);
        let response = send(
            s.request(Method::POST, "/certificates/issued/0123456789ABCDEF/revoke")
                .json(&json!({"reason": "keyCompromise"})),
        );
        assert_code(&response, 404, 404_207);

        // Revoke.
        let (status, revoked, _) = send(
            s.request(Method::POST, &revoke_path)
                .json(&json!({"reason": "keyCompromise"})),
        );
        assert_eq!(status, 200, "{revoked}");
        assert_eq!(revoked["status"], "revoked");
        assert_eq!(revoked["reason"], "keyCompromise");
        let response = send(
            s.request(Method::POST, &revoke_path)
                .json(&json!({"reason": "keyCompromise"})),
        );
        assert_code(&response, 409, 409_204);

        // The live MQTT connection is closed.
        let mut buffer = [0u8; 16];
        let read = live.read(&mut buffer);
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the connection of a revoked certificate stayed open: {read:?}"
        );

        // OCSP: revoked (with the reason); CRL: rejected.
        let ocsp = openssl_ocsp(s, dir.path(), &intermediate_path, &leaf_path);
        assert!(
            ocsp_status(&ocsp, &leaf_path).starts_with("revoked"),
            "{ocsp}"
        );
        assert!(
            ocsp.contains("keyCompromise") || ocsp.contains("Key Compromise"),
            "{ocsp}"
        );
        let (ok, output) = verify_with_crl(s, dir.path(), &intermediate_path, &leaf_path);
        assert!(
            !ok,
            "openssl verify accepted a revoked certificate: {output}"
        );
        assert!(output.contains("revoked"), "{output}");

        // Enforcement: DPS refuses the certificate (401005), the hub too (HTTPS and MQTT).
        let response = register_x509(s, &device, id);
        assert_code(&response, 401, 401_005);
        let operation = format!(
            "/{}/registrations/{id}/operations/{pending_operation}",
            s.id_scope
        );
        let response = send(s.dps_request(&device, Method::GET, &operation, None));
        assert_code(&response, 401, 401_005);
        assert_eq!(
            telemetry_status(s, id, &format!("{leaf}{intermediate}"), &device_key),
            401
        );
        assert_eq!(
            mqtt_connect(s, id, &format!("{leaf}{intermediate}"), &device_key).err(),
            Some(5),
            "CONNACK 5 (not authorized) for a revoked certificate"
        );

        // Lists and the audit trail show it.
        let (_, list, _) = send(s.request(Method::GET, "/certificates/issued?status=revoked"));
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        let (_, audit, _) = send(s.request(
            Method::GET,
            &format!("/audit?registrationId={id}&action=revoke"),
        ));
        assert_eq!(audit.as_array().unwrap().len(), 1, "{audit}");
        assert_eq!(audit[0]["reason"], "keyCompromise");
        assert!(
            audit[0]["actor"]
                .as_str()
                .unwrap()
                .contains("provisioningserviceowner"),
            "{audit}"
        );
    });
}

/// Bulk revocation by registration and by group, malformed OCSP requests, the GET form of
/// OCSP, and a CRL number that keeps rising across a restart.
#[test]
fn bulk_revocation_ocsp_errors_and_crl_numbers() {
    for backend in backends() {
        let mut s = TestServer::start(backend);
        eprintln!("--- {backend:?}");
        let dir = tempfile::tempdir().unwrap();
        let id = "pki-bulk-01";
        let key = enroll_symmetric(&s, id);
        let (first, intermediate, _) = register_with_csr(&s, id, &key);
        let (second, _, _) = register_with_csr(&s, id, &key);
        assert_ne!(serial_of(&first), serial_of(&second));

        // Malformed OCSP: status malformedRequest (1), over POST and GET.
        let url = format!("https://localhost:{}/ocsp", s.https_port());
        let response = s
            .client
            .post(&url)
            .header("Content-Type", "application/ocsp-request")
            .body("garbage")
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response.bytes().unwrap().as_ref(),
            [0x30, 0x03, 0x0a, 0x01, 0x01]
        );
        let response = s.client.get(format!("{url}/%%%")).send().unwrap();
        assert_eq!(
            response.bytes().unwrap().as_ref(),
            [0x30, 0x03, 0x0a, 0x01, 0x01]
        );

        // GET form: a request built by openssl, base64 then URL-encoded.
        let leaf_path = write(dir.path(), "leaf.pem", &first);
        let intermediate_path = write(dir.path(), "intermediate.pem", &intermediate);
        let request_path = dir.path().join("request.der");
        let output = Command::new("openssl")
            .arg("ocsp")
            .arg("-issuer")
            .arg(&intermediate_path)
            .arg("-cert")
            .arg(&leaf_path)
            .arg("-reqout")
            .arg(&request_path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let request = std::fs::read(&request_path).unwrap();
        let encoded = percent_encoding::utf8_percent_encode(
            &B64.encode(&request),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        let response = s.client.get(format!("{url}/{encoded}")).send().unwrap();
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/ocsp-response")
        );
        let der = response.bytes().unwrap();
        let parsed = openssl::ocsp::OcspResponse::from_der(&der).expect("an OCSP response");
        assert_eq!(
            parsed.status(),
            openssl::ocsp::OcspResponseStatus::SUCCESSFUL
        );

        let crl_number = |s: &TestServer| -> i64 {
            let pem = s
                .client
                .get(format!(
                    "https://localhost:{}/crl?format=pem",
                    s.https_port()
                ))
                .send()
                .unwrap()
                .text()
                .unwrap();
            let path = write(dir.path(), "n.pem", pem);
            let out = Command::new("openssl")
                .args(["crl", "-noout", "-crlnumber", "-in"])
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let hex = text
                .trim()
                .trim_start_matches("crlNumber=")
                .trim_start_matches("0x");
            i64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{text}"))
        };
        let before = crl_number(&s);

        // Revoke every certificate of the registration.
        let (status, body, _) = send(
            s.request(
                Method::POST,
                &format!("/registrations/{id}/revokeCertificates"),
            )
            .json(&json!({"reason": "cessationOfOperation"})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["revoked"].as_array().unwrap().len(), 2, "{body}");
        let after = crl_number(&s);
        assert!(after > before, "{before} -> {after}");
        s.restart();
        let (status, body, _) = send(
            s.request(
                Method::POST,
                &format!("/registrations/{id}/revokeCertificates"),
            )
            .json(&json!({})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["revoked"].as_array().unwrap().len(),
            0,
            "nothing left: {body}"
        );

        // Group revocation: a group member's certificates; unknown group: 404.
        let response = send(
            s.request(
                Method::POST,
                "/enrollmentGroups/no-such-group/revokeCertificates",
            )
            .json(&json!({})),
        );
        assert_code(&response, 404, 404_203);
        let (status, body, _) = send(
            s.request(Method::PUT, "/enrollmentGroups/sym-group")
                .json(&json!({"attestation": {"type": "symmetricKey"}})),
        );
        assert_eq!(status, 200, "{body}");
        let group_key = body["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_string();
        let member = "pki-member-01";
        let member_key =
            zerotouch_attestation::symmetric_key::derive_device_key(&group_key, member).unwrap();
        register_with_csr(&s, member, &member_key);
        let (status, body, _) = send(
            s.request(
                Method::POST,
                "/enrollmentGroups/sym-group/revokeCertificates",
            )
            .json(&json!({"reason": "affiliationChanged"})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["revoked"].as_array().unwrap().len(), 1, "{body}");
        assert_eq!(body["revoked"][0]["registrationId"], member);

        // The CLI revokes too (`zerotouch cert revoke`), and lists.
        let (third, _, _) = register_with_csr(&s, member, &member_key);
        let cli = |args: &[&str]| {
            let mut argv = vec!["zerotouch"];
            argv.extend_from_slice(args);
            let cs = s.owner_connection_string();
            let bundle = s.ca_bundle();
            argv.extend_from_slice(&["--connection-string", &cs]);
            argv.extend_from_slice(&["--ca-file", bundle.to_str().unwrap()]);
            let parsed = <zerotouch_service::cli::Cli as clap::Parser>::try_parse_from(&argv)
                .expect("CLI arguments parse");
            zerotouch_service::cli::run(parsed)
        };
        let third_serial = serial_of(&third);
        cli(&["cert", "revoke", &third_serial, "--reason", "superseded"]).expect("cert revoke");
        assert!(
            cli(&["cert", "revoke", &third_serial]).is_err(),
            "already revoked"
        );
        cli(&["cert", "list", "--registration-id", member]).expect("cert list");
        cli(&["audit", "list", "--action", "revoke"]).expect("audit list");
        let (_, record, _) =
            send(s.request(Method::GET, &format!("/certificates/issued/{third_serial}")));
        assert_eq!(record["status"], "revoked", "{record}");
        assert_eq!(record["reason"], "superseded", "{record}");

        let last = crl_number(&s);
        assert!(
            last > after,
            "the CRL number rose across the restart: {after} -> {last}"
        );
    }
}

/// `curl` against the EST base with `args`; returns (HTTP status, body).
fn curl(s: &TestServer, dir: &Path, path: &str, args: &[&str]) -> (u16, Vec<u8>) {
    let out = dir.join("curl.out");
    let output = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(s.ca_bundle())
        .args(["-o"])
        .arg(&out)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(format!(
            "https://localhost:{}/.well-known/est{path}",
            s.https_port()
        ))
        .current_dir(dir)
        .output()
        .expect("curl runs");
    assert!(output.status.success(), "curl: {output:?}");
    let status = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    (status, std::fs::read(&out).unwrap_or_default())
}

/// `openssl req`: a new P-256 key `{name}.key` and a base64 DER CSR `{name}.b64` for `subject`.
fn openssl_csr(dir: &Path, name: &str, subject: &str) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-subj",
            subject,
        ])
        .args(["-outform", "DER", "-out", &format!("{name}.der")])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status = Command::new("openssl")
        .args([
            "base64",
            "-in",
            &format!("{name}.der"),
            "-out",
            &format!("{name}.b64"),
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
}

/// The certificates of a base64 certs-only PKCS#7 body, as PEM, through `openssl pkcs7`.
fn pkcs7_certs(dir: &Path, body: &[u8]) -> Vec<String> {
    std::fs::write(dir.join("p7.b64"), body).unwrap();
    let decoded = Command::new("openssl")
        .args(["base64", "-d", "-in", "p7.b64", "-out", "p7.der"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(decoded.status.success(), "{decoded:?}");
    let printed = Command::new("openssl")
        .args(["pkcs7", "-inform", "DER", "-in", "p7.der", "-print_certs"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    String::from_utf8_lossy(&printed.stdout)
        .split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| b[b.find("-----BEGIN").unwrap()..].to_string())
        .collect()
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn issued_count(s: &TestServer) -> usize {
    let (_, list, _) = send(s.request(Method::GET, "/certificates/issued"));
    list.as_array().map_or(0, Vec::len)
}

/// EST end to end with curl and openssl: cacerts, csrattrs, simpleenroll (HTTP Basic with
/// the device key), simplereenroll (TLS client certificate), and every refusal leaving
/// nothing issued.
#[test]
fn est_enroll_and_reenroll_with_curl_and_openssl() {
    each_backend(|s| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        // cacerts: intermediate and root; csrattrs: nothing asked.
        let (status, body) = curl(s, d, "/cacerts", &[]);
        assert_eq!(status, 200);
        assert_eq!(pkcs7_certs(d, &body).len(), 2);
        let (status, _) = curl(s, d, "/csrattrs", &[]);
        assert_eq!(status, 204);

        // A symmetric-key device that renews any time, provisioned through DPS.
        let id = "est-dev-01";
        let (status, body, _) = send(
            s.request(Method::PUT, &format!("/enrollments/{id}"))
                .json(&json!({"attestation": {"type": "symmetricKey"},
                    "renewalPolicy": {"windowFraction": 0.0}})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["renewalPolicy"]["windowFraction"], 0.0);
        let key = body["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_string();
        let response = send(
            s.request(Method::PUT, "/enrollments/bad-policy")
                .json(&json!({
                "attestation": {"type": "symmetricKey"},
                "renewalPolicy": {"windowFraction": 2}})),
        );
        assert_code(&response, 400, 400_007);

        openssl_csr(d, "first", &format!("/CN={id}"));
        let basic = format!("{id}:{key}");
        let enroll_args = [
            "-u",
            basic.as_str(),
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            "@first.b64",
        ];
        // Not provisioned yet: refused.
        let (status, body) = curl(s, d, "/simpleenroll", &enroll_args);
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (401, Some(401_000))
        );
        let token = c_sdk_device_sas(&s.id_scope, id, &key, now() + 600);
        s.register_and_poll(&s.client, id, Some(&token), &json!({"registrationId": id}));
        assert_eq!(issued_count(s), 0);

        // Refusals: wrong key, malformed PKCS#10, CN mismatch. Nothing is issued.
        let wrong = format!(
            "{id}:{}",
            zerotouch_attestation::symmetric_key::generate_key().unwrap()
        );
        let (status, _) = curl(
            s,
            d,
            "/simpleenroll",
            &["-u", &wrong, "--data-binary", "@first.b64"],
        );
        assert_eq!(status, 401);
        std::fs::write(d.join("garbage.b64"), "bm90IGEgY3NyIGF0IGFsbA==\r\n").unwrap();
        let (status, body) = curl(
            s,
            d,
            "/simpleenroll",
            &["-u", &basic, "--data-binary", "@garbage.b64"],
        );
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (400, Some(400_016))
        );
        openssl_csr(d, "other", "/CN=somebody-else");
        let (status, body) = curl(
            s,
            d,
            "/simpleenroll",
            &["-u", &basic, "--data-binary", "@other.b64"],
        );
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (400, Some(400_016))
        );
        assert_eq!(issued_count(s), 0);

        // simpleenroll.
        let (status, body) = curl(s, d, "/simpleenroll", &enroll_args);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let certs = pkcs7_certs(d, &body);
        assert_eq!(certs.len(), 1);
        std::fs::write(d.join("first.pem"), &certs[0]).unwrap();
        let first_serial = serial_of(&certs[0]);
        assert_eq!(issued_count(s), 1);

        // simplereenroll with the certificate just issued, a new key, the same subject.
        openssl_csr(d, "second", &format!("/CN={id}"));
        let reenroll = |cert: &str, key: &str, csr: &str| {
            curl(
                s,
                d,
                "/simplereenroll",
                &["--cert", cert, "--key", key, "--data-binary", csr],
            )
        };
        // Subject mismatch: 400017.
        let (status, body) = reenroll("first.pem", "first.key", "@other.b64");
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (400, Some(400_017))
        );
        // Malformed: 400016.
        let (status, body) = reenroll("first.pem", "first.key", "@garbage.b64");
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (400, Some(400_016))
        );
        // A foreign certificate: 401.
        let foreign_ca = pki::TestCa::new("Foreign EST CA");
        let (foreign, foreign_key) = foreign_ca.issue(id);
        std::fs::write(d.join("foreign.pem"), foreign).unwrap();
        std::fs::write(d.join("foreign.key"), foreign_key).unwrap();
        let (status, _) = reenroll("foreign.pem", "foreign.key", "@second.b64");
        assert_eq!(status, 401);
        // No client certificate: 401.
        let (status, _) = curl(s, d, "/simplereenroll", &["--data-binary", "@second.b64"]);
        assert_eq!(status, 401);
        assert_eq!(issued_count(s), 1);

        let (status, body) = reenroll("first.pem", "first.key", "@second.b64");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let renewed = pkcs7_certs(d, &body);
        assert_eq!(renewed.len(), 1);
        assert_ne!(serial_of(&renewed[0]), first_serial);
        std::fs::write(d.join("second.pem"), &renewed[0]).unwrap();
        let (_, audit, _) = send(s.request(
            Method::GET,
            &format!("/audit?registrationId={id}&action=renew"),
        ));
        assert_eq!(audit.as_array().unwrap().len(), 1, "{audit}");
        assert_eq!(audit[0]["detail"]["previousSerial"], first_serial.as_str());
        assert_eq!(issued_count(s), 2);

        // A revoked certificate cannot re-enroll: 401005.
        let (status, body, _) = send(
            s.request(
                Method::POST,
                &format!("/certificates/issued/{first_serial}/revoke"),
            )
            .json(&json!({"reason": "superseded"})),
        );
        assert_eq!(status, 200, "{body}");
        let (status, body) = reenroll("first.pem", "first.key", "@second.b64");
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (401, Some(401_005))
        );
        assert_eq!(issued_count(s), 2);

        // The default policy (last third of the lifetime): a fresh certificate is too early.
        let id = "est-dev-02";
        let key = enroll_symmetric(s, id);
        let token = c_sdk_device_sas(&s.id_scope, id, &key, now() + 600);
        s.register_and_poll(&s.client, id, Some(&token), &json!({"registrationId": id}));
        openssl_csr(d, "third", &format!("/CN={id}"));
        let basic = format!("{id}:{token}");
        let (status, body) = curl(
            s,
            d,
            "/simpleenroll",
            &["-u", &basic, "--data-binary", "@third.b64"],
        );
        assert_eq!(
            status,
            200,
            "SAS token as Basic password: {}",
            String::from_utf8_lossy(&body)
        );
        std::fs::write(d.join("third.pem"), &pkcs7_certs(d, &body)[0]).unwrap();
        let (status, body) = reenroll("third.pem", "third.key", "@third.b64");
        assert_eq!(
            (status, json_of(&body)["errorCode"].as_u64()),
            (403, Some(403_002)),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(issued_count(s), 3);
    });
}
