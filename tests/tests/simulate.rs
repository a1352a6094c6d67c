//! `zerotouch simulate` against a real server: devices provision (symmetric-key group over
//! MQTT; X.509 with a CSR over HTTPS), connect to the assigned hub with what they got, and their
//! telemetry and reported twin patches are acknowledged.

use reqwest::Method;
use serde_json::Value;
use zerotouch_simulate::SimulateArgs;
use zerotouch_tests::{Backend, TestServer, send};

/// The `simulate` verb as the `zerotouch` binary parses it.
#[derive(clap::Parser)]
#[command(name = "zerotouch")]
enum Zerotouch {
    Simulate(SimulateArgs),
}

fn parse(argv: &[&str]) -> SimulateArgs {
    let Zerotouch::Simulate(args) =
        <Zerotouch as clap::Parser>::try_parse_from(argv).expect("arguments parse");
    args
}

fn simulate(server: &TestServer, extra: &[&str]) -> Value {
    let cs = server.owner_connection_string();
    let ca = server.ca_bundle();
    let mqtt_port = server.mqtt_port().to_string();
    let mut argv = vec![
        "zerotouch",
        "simulate",
        "--connection-string",
        &cs,
        "--id-scope",
        &server.id_scope,
        "--ca-file",
        ca.to_str().expect("utf-8 path"),
        "--mqtt-port",
        &mqtt_port,
        "--quiet",
        "--setup-timeout",
        "20",
        "--drain",
        "3",
    ];
    argv.extend_from_slice(extra);
    zerotouch_simulate::report(parse(&argv)).expect("the simulation runs")
}

fn assert_healthy(report: &Value, devices: u64) {
    assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["devices"]["provisioned"], devices, "{report:#}");
    assert_eq!(report["devices"]["connected"], devices, "{report:#}");
    let telemetry = &report["telemetry"];
    assert!(telemetry["sent"].as_u64().expect("sent") > 0, "{report:#}");
    assert_eq!(telemetry["acked"], telemetry["sent"], "{report:#}");
    assert!(report["provisioning"]["latency_ms"]["p99"].is_number());
}

#[test]
fn symmetric_key_group_devices_provision_over_mqtt_and_send_telemetry_and_twin_updates() {
    let server = TestServer::start(Backend::Sqlite);
    let report = simulate(
        &server,
        &[
            "--devices",
            "4",
            "--duration",
            "2",
            "--rate",
            "5",
            "--twin-rate",
            "2",
            "--prefix",
            "simsk",
            "--json",
        ],
    );
    assert_healthy(&report, 4);
    let twin = &report["twin"];
    assert!(twin["sent"].as_u64().expect("sent") > 0, "{report:#}");
    assert_eq!(twin["acked"], twin["sent"], "{report:#}");

    // The server agrees: the registration is assigned, and the twin holds the last patch.
    let (status, body, _) = send(server.request(Method::GET, "/registrations/simsk-00002"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "assigned");
    let (status, twin, _) = send(server.hub_request(Method::GET, "/twins/simsk-00002"));
    assert_eq!(status, 200, "{twin}");
    assert!(
        twin["properties"]["reported"]["simulator"]["seq"].is_number(),
        "{twin}"
    );
}

#[test]
fn x509_devices_with_issued_certificates_provision_over_https_and_send_telemetry() {
    let server = TestServer::start(Backend::Sqlite);
    let report = simulate(
        &server,
        &[
            "--devices",
            "3",
            "--duration",
            "1",
            "--rate",
            "5",
            "--twin-rate",
            "0",
            "--attestation",
            "x509",
            "--csr",
            "--transport",
            "https",
            "--prefix",
            "simx",
            "--json",
        ],
    );
    assert_healthy(&report, 3);
    assert_eq!(report["provisioning"]["csr"], true);
    // The hub identity authenticates with the issued certificate (our CA), not the leaf.
    let (status, device, _) = send(server.hub_request(Method::GET, "/devices/simx-00000"));
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["authentication"]["type"], "certificateAuthority");
}

#[test]
fn non_loopback_targets_are_refused_without_host() {
    let server = TestServer::start(Backend::Sqlite);
    let cs = "HostName=192.0.2.10:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=a2V5";
    let ca = server.ca_bundle();
    let args = parse(&[
        "zerotouch",
        "simulate",
        "--connection-string",
        cs,
        "--id-scope",
        &server.id_scope,
        "--ca-file",
        ca.to_str().expect("utf-8 path"),
        "--quiet",
    ]);
    let err = zerotouch_simulate::report(args).expect_err("refused");
    assert!(err.to_string().contains("--host"), "{err}");
}
