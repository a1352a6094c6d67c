//! The server's log, as a real `zerotouch serve` process writes it: nothing a client sends can
//! forge a line or flood one (control characters are escaped, long ids cut), and a log that
//! cannot be written (a full disk, a pipe nobody reads) never stops the server from answering.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use zerotouch_tests::mqtt::{self, Login};
use zerotouch_tests::{client_trusting, cluster};

/// A `zerotouch serve` process whose stderr is `stderr`, on an address of its own.
struct LoggingServer {
    child: std::process::Child,
    ip: String,
    dir: tempfile::TempDir,
}

impl LoggingServer {
    fn start(stderr: Stdio) -> LoggingServer {
        let ip = cluster::address(cluster::address_block(), 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("zerotouch.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nhttps = \"{ip}:{port}\"\nmqtt = \"{ip}:8883\"\n[service]\n\
                 hostnames = [\"{ip}\"]\ndata_dir = \"{}\"\n",
                dir.path().join("data").display(),
                port = cluster::HTTPS_PORT,
            ),
        )
        .expect("config");
        let child = Command::new(cluster::program())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start zerotouch");
        let server = LoggingServer { child, ip, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.dir.path().join("data/ca/bundle.pem").exists()
            || std::net::TcpStream::connect((server.ip.as_str(), cluster::HTTPS_PORT)).is_err()
        {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}:{}{path}", self.ip, cluster::HTTPS_PORT)
    }

    fn ca_bundle(&self) -> std::path::PathBuf {
        self.dir.path().join("data/ca/bundle.pem")
    }

    /// The server's own CLI on its config.
    fn cli(&self, args: &[&str]) -> serde_json::Value {
        let output = Command::new(cluster::program())
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("zerotouch.toml"))
            .output()
            .expect("zerotouch");
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).expect("JSON")
    }

    /// Sends `count` requests, each of which logs a line, and fails if any goes unanswered.
    fn hammer(&self, count: usize) {
        let client = client_trusting(&self.ca_bundle(), None);
        for i in 0..count {
            let response = client
                .get(self.url(&format!("/no/such/route/{i}")))
                .timeout(Duration::from_secs(10))
                .send();
            assert!(
                response.is_ok_and(|r| r.status() == 404),
                "request {i} went unanswered: the log wedged the server"
            );
        }
    }

    fn dropped_lines(&self) -> u64 {
        let client = client_trusting(&self.ca_bundle(), None);
        let text = client
            .get(self.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("metrics");
        text.lines()
            .find_map(|line| line.strip_prefix("zerotouch_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no zerotouch_log_lines_dropped_total in\n{text}"))
    }
}

impl Drop for LoggingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_log_on_a_full_disk_drops_lines_and_the_server_keeps_answering() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let server = LoggingServer::start(Stdio::from(full));
    server.hammer(300);
    assert!(
        server.dropped_lines() > 0,
        "lines that could not be written were not counted"
    );
}

#[test]
fn a_log_pipe_nobody_reads_never_blocks_requests() {
    // The read end stays open and unread: once the pipe's buffer (64 KiB) is full, a
    // synchronous write to stderr would block the worker that logs.
    let (read_end, write_end) = std::io::pipe().expect("pipe");
    let server = LoggingServer::start(Stdio::from(write_end));
    server.hammer(1500);
    drop(server);
    drop(read_end);
}

/// A forged line: what an attacker hopes to see at the start of a line of the log.
const FORGED: &str = "2031-01-01T00:00:00.000000Z  INFO zerotouch_service: forged";

/// MQTT client ids, usernames and HTTPS paths carrying line breaks and a 10,000-character id.
#[test]
fn client_input_cannot_forge_or_flood_log_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let server = LoggingServer::start(Stdio::from(log));
    let credentials = server.cli(&["credentials"]);
    let hub_cs = credentials["hubConnectionString"].as_str().expect("hub cs");
    let key = hub_cs
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("key");

    let injected = format!("evil\n{FORGED}");
    let long_id = "x".repeat(10_000);
    let port = cluster::HTTPS_PORT;
    for client_id in [injected.as_str(), long_id.as_str()] {
        // Over MQTT, to the hub (an unknown device) and to DPS (a bad scope).
        let hub_user = mqtt::hub_username(client_id);
        let dps_user = mqtt::dps_username("0ne00000000", client_id);
        for username in [hub_user.as_str(), dps_user.as_str()] {
            let refused = mqtt_refused(&server, client_id, username);
            assert!(refused, "a CONNECT as {client_id:.20}… was not refused");
        }
        // Over HTTPS, on authenticated hub paths.
        let client = client_trusting(&server.ca_bundle(), None);
        let now = zerotouch_service::time::now_unix();
        let sas = zerotouch_attestation::symmetric_key::sign(
            &format!("{}:{port}", server.ip),
            key,
            now + 600,
            Some("iothubowner"),
        )
        .expect("sign");
        let encoded =
            percent_encoding::utf8_percent_encode(client_id, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        for (method, path) in [
            (Method::PUT, format!("/devices/{encoded}")),
            (Method::GET, format!("/twins/{encoded}")),
            (Method::POST, format!("/devices/{encoded}/messages/events")),
        ] {
            let response = client
                .request(
                    method.clone(),
                    server.url(&format!("{path}?api-version=2021-04-12")),
                )
                .header("Authorization", &sas)
                .json(&json!({"deviceId": client_id}))
                .send()
                .expect("answer");
            assert!(
                response.status().is_client_error(),
                "{method} {path:.40}…: {}",
                response.status()
            );
        }
    }

    // The writer thread drains its queue on its own time: wait for the last request's line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).expect("log");
        if text.contains("/messages/events") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let forged: Vec<&str> = text.lines().filter(|l| l.starts_with(FORGED)).collect();
    assert!(forged.is_empty(), "forged lines in the log: {forged:#?}");
    assert!(
        text.contains("evil\\n2031-01-01"),
        "the injected id is not in the log, escaped:\n{text}"
    );
    // A line holds a few fields of at most 256 characters and a message of at most 1,024.
    let flooding: Vec<usize> = text
        .lines()
        .map(str::len)
        .filter(|&len| len > 4096)
        .collect();
    assert!(
        flooding.is_empty(),
        "lines carry the long id uncut (lengths {flooding:?})"
    );
    assert!(
        text.contains("more bytes]"),
        "no cut value in the log:\n{text}"
    );
}

fn mqtt_refused(server: &LoggingServer, client_id: &str, username: &str) -> bool {
    let login = Login {
        client_id,
        username,
        password: Some("SharedAccessSignature sr=x&sig=y&se=1"),
        identity: None,
        clean_session: true,
    };
    mqtt::connect_to(&server.ip, 8883, &server.ca_bundle(), &login).is_err()
}
