//! Authorization (SAS and bearer tokens, 401 vs 403), policies, bootstrap and restart, TLS
//! listeners, health and metrics.

use std::net::TcpStream;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use reqwest::Method;
use serde_json::json;
use zerotouch_service::auth::Rights;
use zerotouch_tests::{Backend, TestServer, backends, client_trusting, error_code, pki, send};

#[test]
fn sas_failures_are_401_and_missing_rights_403() {
    let s = TestServer::start(Backend::Sqlite);
    let get = |auth: Option<String>| {
        let mut request = s.client.get(s.url("/enrollments/x"));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        send(request)
    };
    let (status, err, _) = get(None);
    assert_eq!((status, error_code(&err)), (401, 401_000));
    let (status, err, _) = get(Some(s.sas(
        "provisioningserviceowner",
        &owner_key(&s),
        -120,
    )));
    assert_eq!((status, error_code(&err)), (401, 401_001), "expired");
    let wrong = zerotouch_attestation::symmetric_key::generate_key().unwrap();
    let (status, err, _) = get(Some(s.sas("provisioningserviceowner", &wrong, 600)));
    assert_eq!((status, error_code(&err)), (401, 401_002), "wrong key");
    let (status, err, _) = get(Some(s.sas("nobody", &wrong, 600)));
    assert_eq!((status, error_code(&err)), (401, 401_002), "unknown policy");

    // A read-only policy: reads work (404 for a missing enrollment), writes are 403.
    let (status, policy, _) = send(
        s.request(Method::PUT, "/authorizationPolicies/reader")
            .json(&json!({"rights": "EnrollmentRead"})),
    );
    assert_eq!(status, 200, "{policy}");
    let reader_key = policy["primaryKey"].as_str().unwrap().to_string();
    let (status, _, _) = get(Some(s.sas("reader", &reader_key, 600)));
    assert_eq!(status, 404);
    let (status, err, _) = send(
        s.client
            .put(s.url("/enrollments/x"))
            .header("Authorization", s.sas("reader", &reader_key, 600))
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!((status, error_code(&err)), (403, 403_001));

    // Rotating the key invalidates tokens signed with the old one.
    let (status, rotated, _) = send(
        s.request(Method::POST, "/authorizationPolicies/reader/regenerateKey")
            .json(&json!({"keyType": "primary"})),
    );
    assert_eq!(status, 200);
    assert_ne!(rotated["primaryKey"], policy["primaryKey"]);
    let (status, _, _) = get(Some(s.sas("reader", &reader_key, 600)));
    assert_eq!(status, 401);

    // The last ServiceConfig policy cannot be removed or demoted.
    let (status, err, _) = send(s.request(
        Method::DELETE,
        "/authorizationPolicies/provisioningserviceowner",
    ));
    assert_eq!((status, error_code(&err)), (409, 409_202));
    let (status, list, _) = send(s.request(Method::GET, "/authorizationPolicies"));
    assert_eq!(status, 200);
    assert_eq!(list["value"].as_array().unwrap().len(), 2);
    let (status, _, _) = send(s.request(Method::DELETE, "/authorizationPolicies/reader"));
    assert_eq!(status, 204);
}

fn owner_key(s: &TestServer) -> String {
    let cs = s.owner_connection_string();
    zerotouch_service::bootstrap::parse_connection_string(&cs)
        .unwrap()
        .2
}

#[test]
fn bearer_tokens_carry_rights() {
    let s = TestServer::start(Backend::Sqlite);
    let instance = &s.running().bound.instance;
    let now = zerotouch_service::time::now_unix();
    let mint = |rights: Rights, ttl: u64| {
        zerotouch_service::auth::mint_token(
            &instance.token_secret,
            &instance.id_scope,
            "test",
            rights,
            now,
            ttl,
        )
        .unwrap()
    };
    let writer = mint(Rights::ENROLLMENT_WRITE.union(Rights::ENROLLMENT_READ), 600);
    let (status, _, _) = send(
        s.client
            .put(s.url("/enrollments/jwt-dev"))
            .bearer_auth(&writer)
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200);
    let reader = mint(Rights::REGISTRATION_STATUS_READ, 600);
    let (status, err, _) = send(
        s.client
            .get(s.url("/enrollments/jwt-dev"))
            .bearer_auth(&reader),
    );
    assert_eq!((status, error_code(&err)), (403, 403_001));
    let expired = zerotouch_service::auth::mint_token(
        &instance.token_secret,
        &instance.id_scope,
        "test",
        Rights::ALL,
        now - 100,
        10,
    )
    .unwrap();
    let (status, err, _) = send(
        s.client
            .get(s.url("/enrollments/jwt-dev"))
            .bearer_auth(&expired),
    );
    assert_eq!((status, error_code(&err)), (401, 401_001));
    let (status, err, _) = send(
        s.client
            .get(s.url("/enrollments/jwt-dev"))
            .bearer_auth("a.b.c"),
    );
    assert_eq!((status, error_code(&err)), (401, 401_000));
}

#[test]
fn restart_keeps_id_scope_ca_and_data() {
    for backend in backends() {
        let mut s = TestServer::start(backend);
        let scope = s.id_scope.clone();
        let bundle = std::fs::read_to_string(s.ca_bundle()).unwrap();
        let key_path = s.running().bound.instance.paths.intermediate_key.clone();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(scope.starts_with("0ne") && scope.len() == 11, "{scope}");
        let (status, _, _) = send(
            s.request(Method::PUT, "/enrollments/survivor")
                .json(&json!({"attestation": {"type": "symmetricKey"}})),
        );
        assert_eq!(status, 200);

        s.restart();
        assert_eq!(s.id_scope, scope, "{backend:?}");
        assert_eq!(std::fs::read_to_string(s.ca_bundle()).unwrap(), bundle);
        let (status, health, _) = send(
            s.client
                .get(format!("https://localhost:{}/healthz", s.https_port())),
        );
        assert_eq!(status, 200);
        assert_eq!(health["idScope"], scope.as_str());
        let (status, _, _) = send(s.request(Method::GET, "/enrollments/survivor"));
        assert_eq!(status, 200, "{backend:?}");
    }
}

#[test]
fn tls_offers_1_2_and_passes_client_certificates_to_handlers() {
    let s = TestServer::start(Backend::Sqlite);
    let base = format!("https://localhost:{}", s.https_port());
    // No client certificate: fine.
    let (status, seen, headers) = send(s.client.get(format!("{base}/tls/client-certificate")));
    assert_eq!(status, 200);
    assert_eq!(seen["presented"], false);
    assert!(headers.contains_key("x-ms-request-id"));
    // A device certificate from a CA the server has never seen still gets through the handshake.
    let ca = pki::TestCa::new("Device Maker");
    let (leaf, key) = ca.issue("device-42");
    let chain = format!("{leaf}{}", ca.cert_pem);
    let client = client_trusting(&s.ca_bundle(), Some((&chain, &key)));
    let (status, seen, _) = send(client.get(format!("{base}/tls/client-certificate")));
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["presented"], true);
    assert_eq!(seen["leaf"]["subjectName"], "CN=device-42");
    assert_eq!(seen["chainLength"], 1);
    assert_eq!(seen["verifiedByServerCa"], false);

    // TLS 1.2 exactly (the Azure Python SDK's only version), on both listeners.
    for port in [s.https_port(), s.mqtt_port()] {
        let mut connector = SslConnector::builder(SslMethod::tls_client()).unwrap();
        connector.set_ca_file(s.ca_bundle()).unwrap();
        connector
            .set_max_proto_version(Some(SslVersion::TLS1_2))
            .unwrap();
        connector.set_verify(SslVerifyMode::PEER);
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let tls = connector
            .build()
            .connect("localhost", stream)
            .expect("TLS 1.2 handshake");
        assert_eq!(tls.ssl().version_str(), "TLSv1.2");
    }
}

#[test]
fn wrong_method_is_a_405_with_error_json() {
    let s = TestServer::start(Backend::Sqlite);
    let (status, err, headers) = send(s.request(Method::PATCH, "/enrollments/x"));
    assert_eq!((status, error_code(&err)), (405, 405_001));
    assert_eq!(headers["x-ms-error-code"], "405001");
}

#[test]
fn health_and_metrics() {
    let s = TestServer::start(Backend::Sqlite);
    let base = format!("https://localhost:{}", s.https_port());
    let (status, _, _) = send(s.client.get(format!("{base}/healthz")));
    assert_eq!(status, 200);
    let _ = send(s.request(Method::GET, "/enrollments/nope"));
    let text = s
        .client
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains("zerotouch_http_requests_total{method=\"GET\",route=\"/enrollments/{id}\",status=\"404\"} 1"),
        "{text}"
    );
    assert!(text.contains("zerotouch_http_request_duration_seconds_bucket"));
}
