use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::hub;

/// An enrollment as the service hands it over: without secrets.
fn enrollment() -> Value {
    json!({
        "enrollmentGroupId": "grp",
        "attestation": {
            "type": "x509",
            "x509": {
                "signingCertificates": {
                    "primary": {"info": {"subjectName": "CN=ca", "sha256Thumbprint": "AB"}},
                    "secondary": {"info": {}}
                },
                "caReferences": {"primary": "my-ca"}
            }
        },
        "iotHubs": ["a.example", "b.example"],
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": "https://hook.example/?code=k", "apiVersion": "2021-10-01"},
        "provisioningStatus": "enabled"
    })
}

#[test]
fn build_request_shape() {
    let (a, b) = (hub("a.example"), hub("b.example"));
    let payload = json!({"modelId": "dtmi:x;1"});
    let group = enrollment();
    let context = DeviceRuntimeContext {
        registration_id: "dev-01",
        current_hub: Some("a.example"),
        current_device_id: Some("dev-01"),
        attestation: RuntimeAttestation::SymmetricKey,
        payload: Some(&payload),
    };
    let body = build_request(Enrollment::Group(&group), &context, &[&a, &b]);
    assert_eq!(body["enrollmentGroup"], group);
    assert!(body.get("individualEnrollment").is_none());
    assert_eq!(
        body["deviceRuntimeContext"],
        json!({"registrationId": "dev-01", "currentIotHubHostName": "a.example",
               "currentDeviceId": "dev-01", "symmetricKey": {}, "payload": payload})
    );
    assert_eq!(body["linkedHubs"], json!(["a.example", "b.example"]));

    let individual = json!({"registrationId": "dev-02", "attestation": {"type": "tpm",
        "tpm": {"endorsementKey": "ek", "storageRootKey": "srk"}}});
    let context = DeviceRuntimeContext {
        registration_id: "dev-02",
        current_hub: None,
        current_device_id: None,
        attestation: RuntimeAttestation::Tpm {
            endorsement_key: "ek".into(),
            storage_root_key: None,
        },
        payload: None,
    };
    let body = build_request(Enrollment::Individual(&individual), &context, &[&b]);
    assert_eq!(body["individualEnrollment"], individual);
    assert_eq!(
        body["deviceRuntimeContext"],
        json!({"registrationId": "dev-02", "tpm": {"endorsementKey": "ek"}})
    );
    assert_eq!(body["linkedHubs"], json!(["b.example"]));

    let context = DeviceRuntimeContext {
        attestation: RuntimeAttestation::X509(json!({"subjectName": "CN=dev-02"})),
        ..context
    };
    let body = build_request(Enrollment::Individual(&individual), &context, &[]);
    assert_eq!(
        body["deviceRuntimeContext"]["x509"],
        json!({"subjectName": "CN=dev-02"})
    );
}

#[test]
fn parse_response_table() {
    let (a, b) = (hub("a.example"), hub("b.example"));
    let candidates = [&a, &b];
    let ok = parse_response(
        br#"{"iotHubHostName":"B.example","initialTwin":{"tags":{"x":1}},"payload":{"hello":"device"}}"#,
        &candidates,
    )
    .unwrap();
    assert_eq!(ok.hub.name, "b.example");
    assert_eq!(ok.initial_twin, Some(json!({"tags": {"x": 1}})));
    assert_eq!(ok.payload, Some(json!({"hello": "device"})));

    let minimal = parse_response(
        br#"{"iotHubHostName":"a.example","payload":null}"#,
        &candidates,
    )
    .unwrap();
    assert_eq!(
        (
            minimal.hub.name.as_str(),
            minimal.initial_twin,
            minimal.payload
        ),
        ("a.example", None, None)
    );

    assert_eq!(
        parse_response(br#"{"iotHubHostName":"evil.example"}"#, &candidates),
        Err(WebhookError::HubNotOffered("evil.example".into()))
    );
    for bad in [
        &b"not json"[..],
        b"[]",
        b"{}",
        br#"{"iotHubHostName":7}"#,
        br#"{"iotHubHostName":"a.example","initialTwin":"x"}"#,
    ] {
        assert!(
            matches!(
                parse_response(bad, &candidates),
                Err(WebhookError::BadResponse(_))
            ),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

/// Serves one canned HTTP/1.1 response on an ephemeral loopback port, after `delay`, and hands
/// back the raw request it received.
async fn one_shot(
    status_line: &'static str,
    body: &'static str,
    delay: Duration,
) -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/api/allocate?code=k",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        // Read the head, then Content-Length bytes of body.
        loop {
            let n = socket.read(&mut buffer).await.unwrap();
            assert!(n > 0, "client closed early");
            request.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break;
                }
            }
        }
        tokio::time::sleep(delay).await;
        let response = format!(
            "{status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        // The client may have given up (timeout test): ignore write errors.
        let _ = socket.write_all(response.as_bytes()).await;
        let _ = socket.shutdown().await;
        String::from_utf8(request).unwrap()
    });
    (url, task)
}

fn client(timeout: Duration) -> WebhookClient {
    WebhookClient::new(&WebhookConfig {
        timeout,
        extra_root_ca_pem: None,
        insecure_allow_http: true,
    })
    .unwrap()
}

async fn call(
    status_line: &'static str,
    body: &'static str,
    delay: Duration,
    timeout: Duration,
) -> (
    Result<(String, Option<Value>, Option<Value>), WebhookError>,
    String,
) {
    let (a, b) = (hub("a.example"), hub("b.example"));
    let (url, server) = one_shot(status_line, body, delay).await;
    let request = json!({"deviceRuntimeContext": {"registrationId": "dev-01"}, "linkedHubs": ["a.example", "b.example"]});
    let result = client(timeout)
        .allocate(&url, &request, &[&a, &b])
        .await
        .map(|r| (r.hub.name.clone(), r.initial_twin, r.payload));
    let seen = if delay > timeout {
        String::new()
    } else {
        server.await.unwrap()
    };
    (result, seen)
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn success_posts_json_and_returns_choice() {
    let (result, seen) = call(
        "HTTP/1.1 200 OK",
        r#"{"iotHubHostName":"b.example","payload":{"hi":1}}"#,
        Duration::ZERO,
        5 * SECOND,
    )
    .await;
    assert_eq!(
        result,
        Ok(("b.example".into(), None, Some(json!({"hi": 1}))))
    );
    assert!(
        seen.starts_with("POST /api/allocate?code=k HTTP/1.1\r\n"),
        "{seen}"
    );
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{seen}"
    );
    assert!(
        seen.contains(r#""linkedHubs":["a.example","b.example"]"#),
        "{seen}"
    );
}

#[tokio::test]
async fn hub_not_offered() {
    let (result, _) = call(
        "HTTP/1.1 200 OK",
        r#"{"iotHubHostName":"c.example"}"#,
        Duration::ZERO,
        5 * SECOND,
    )
    .await;
    assert_eq!(result, Err(WebhookError::HubNotOffered("c.example".into())));
}

#[tokio::test]
async fn non_2xx() {
    let (result, _) = call(
        "HTTP/1.1 500 Internal Server Error",
        "{}",
        Duration::ZERO,
        5 * SECOND,
    )
    .await;
    assert_eq!(result, Err(WebhookError::Status(500)));
    let (result, _) = call("HTTP/1.1 302 Found", "", Duration::ZERO, 5 * SECOND).await;
    assert_eq!(result, Err(WebhookError::Status(302)));
}

#[tokio::test]
async fn invalid_json() {
    let (result, _) = call("HTTP/1.1 200 OK", "<html>", Duration::ZERO, 5 * SECOND).await;
    assert!(
        matches!(result, Err(WebhookError::BadResponse(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn timeout() {
    let (result, _) = call(
        "HTTP/1.1 200 OK",
        r#"{"iotHubHostName":"a.example"}"#,
        3 * SECOND,
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(result, Err(WebhookError::Timeout));
}

#[tokio::test]
async fn transport_and_config_errors() {
    let a = hub("a.example");
    // A port nobody listens on: bind, learn the port, close.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let result = client(5 * SECOND)
        .allocate(
            &format!("http://127.0.0.1:{port}/api/allocate?code=function-key-7"),
            &json!({}),
            &[&a],
        )
        .await;
    let Err(WebhookError::Transport(message)) = result else {
        panic!("{result:?}");
    };
    // The message is shown to the device: the URL's key is not in it.
    assert!(!message.contains("function-key-7"), "{message}");

    // http is refused unless explicitly allowed.
    let strict = WebhookClient::new(&WebhookConfig::default()).unwrap();
    let result = strict
        .allocate(&format!("http://127.0.0.1:{port}/"), &json!({}), &[&a])
        .await;
    assert!(matches!(result, Err(WebhookError::Config(_))), "{result:?}");
    let result = strict.allocate("not a url", &json!({}), &[&a]).await;
    assert!(matches!(result, Err(WebhookError::Config(_))), "{result:?}");

    let bad_ca = WebhookClient::new(&WebhookConfig {
        extra_root_ca_pem: Some(
            b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n".to_vec(),
        ),
        ..WebhookConfig::default()
    });
    assert!(matches!(bad_ca, Err(WebhookError::Config(_))), "{bad_ca:?}");
}
