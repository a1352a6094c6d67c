//! A provisioning service and hubs as separate `zerotouch` processes on their own loopback
//! addresses, for the multi-hub tests. Each node gets a data dir (SQLite), a config file, and a
//! log file that is printed when a node fails to start.

use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder};
use serde_json::Value;
use tempfile::TempDir;
use zerotouch_attestation::symmetric_key;

/// HTTPS port of every node (each has its own address).
pub const HTTPS_PORT: u16 = 18443;

/// A fresh `127.a.b.0` block per call: `a` from the process id, `b` counts. Nodes use
/// `.1`, `.2`, …, so tests running at the same time never share an address.
pub fn address_block() -> [u8; 3] {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = 100 + (std::process::id() % 100) as u8;
    [127, a, NEXT.fetch_add(1, Ordering::Relaxed)]
}

pub fn address(block: [u8; 3], host: u8) -> String {
    format!("{}.{}.{}.{host}", block[0], block[1], block[2])
}

/// The `zerotouch` program: this package's `zerotouch-node` (the same code), which cargo
/// builds next to the test executables (`target/<profile>/`, the tests live in `deps/`).
pub fn program() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    profile_dir.join("zerotouch-node")
}

/// One `zerotouch serve` process.
pub struct Node {
    pub ip: String,
    pub dir: TempDir,
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment for every process of this node (server and CLI).
    env: Vec<(String, String)>,
    /// A program (and its arguments) that runs `zerotouch serve`, e.g. `prlimit --nofile=…`.
    wrapper: Vec<String>,
}

impl Node {
    /// Writes `config` (TOML, appended to the node's listen/service sections) and starts
    /// `zerotouch serve` with `args`; returns once HTTPS accepts connections.
    pub fn start(ip: &str, role: &str, config: &str, args: &[&str]) -> Node {
        Node::start_with_env(ip, role, config, args, &[])
    }

    /// [`Node::start`] with extra environment variables for the node's processes.
    pub fn start_with_env(
        ip: &str,
        role: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        Node::start_under(&[], ip, role, config, args, env)
    }

    /// [`Node::start_with_env`] with `serve` run by `wrapper` (a command that execs the rest
    /// of its command line, such as `prlimit --nofile=1024:4096`).
    pub fn start_under(
        wrapper: &[&str],
        ip: &str,
        role: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        Node::start_named(wrapper, ip, &[], role, config, args, env)
    }

    /// A replica: [`Node::start_under`] with names besides its address in
    /// `service.hostnames` (the hub name the replicas share).
    pub fn start_replica(ip: &str, names: &[&str], config: &str, env: &[(&str, &str)]) -> Node {
        Node::start_named(&[], ip, names, "all", config, &[], env)
    }

    fn start_named(
        wrapper: &[&str],
        ip: &str,
        names: &[&str],
        role: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let hostnames: Vec<String> = std::iter::once(ip)
            .chain(names.iter().copied())
            .map(|h| format!("\"{h}\""))
            .collect();
        let text = format!(
            "[listen]\nhttps = \"{ip}:{HTTPS_PORT}\"\nmqtt = \"{ip}:8883\"\n\n\
             [service]\nhostnames = [{}]\ndata_dir = \"{}\"\nrole = \"{role}\"\n\n{config}\n",
            hostnames.join(", "),
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("zerotouch.toml"), text).expect("config");
        let mut node = Node {
            ip: ip.to_string(),
            dir,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
        };
        node.spawn();
        node
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("zerotouch.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// Starts the process (again, after [`Node::kill`]) with the same config and data dir.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let mut command = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program());
                command
            }
            None => Command::new(program()),
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(self.config())
            .args(&self.args)
            .env("RUST_LOG", "warn,zerotouch_service=info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start zerotouch");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = (self.ip.parse::<IpAddr>().expect("ip"), HTTPS_PORT).into();
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "node {} exited ({status}):\n{}",
                    self.ip,
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node {} did not start:\n{}",
            self.ip,
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// The pid of the running `serve` process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Appends TOML to the node's config (takes effect at the next start or CLI call).
    pub fn append_config(&self, text: &str) {
        let mut config = std::fs::read_to_string(self.config()).expect("config");
        config.push_str(text);
        std::fs::write(self.config(), config).expect("config");
    }

    /// The node's own CLI, whatever its outcome.
    pub fn cli_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(program())
            .args(args)
            .arg("--config")
            .arg(self.config())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run zerotouch")
    }

    /// The node's own CLI (`zerotouch <args> --config <its config>`); returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(
            output.status.success(),
            "zerotouch {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `credentials` as JSON.
    pub fn credentials(&self) -> Value {
        serde_json::from_str(&self.cli(&["credentials"])).expect("credentials JSON")
    }

    pub fn ca_bundle(&self) -> PathBuf {
        self.data_dir().join("ca/bundle.pem")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}:{HTTPS_PORT}{path}", self.ip)
    }

    /// The log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` to its end, or kills it after `timeout` and panics (a `serve` that should
/// have refused to start would otherwise run forever). Returns its output.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("output");
                panic!(
                    "{command:?} still ran after {timeout:?}:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A management client for one node, signing with a connection string's policy.
pub struct Api {
    pub client: Client,
    host: String,
    key_name: String,
    key: String,
    base: String,
}

impl Api {
    /// `connection_string` as printed by `credentials`; `ca_bundle` to trust.
    pub fn new(connection_string: &str, ca_bundle: &Path) -> Api {
        let cs =
            crate::load::parse_connection_string(connection_string).expect("connection string");
        Api {
            client: crate::client_trusting(ca_bundle, None),
            base: format!("https://{}", cs.host),
            host: cs.host,
            key_name: cs.policy,
            key: cs.key,
        }
    }

    /// The same API reached at `base` (`https://host:port`), for a connection string whose
    /// host names several replicas.
    pub fn at(connection_string: &str, ca_bundle: &Path, base: &str) -> Api {
        let mut api = Api::new(connection_string, ca_bundle);
        api.base = base.trim_end_matches('/').to_string();
        api
    }

    pub fn request(&self, method: Method, path: &str, api_version: &str) -> RequestBuilder {
        let now = zerotouch_service::time::now_unix();
        let token = symmetric_key::sign(&self.host, &self.key, now + 3600, Some(&self.key_name))
            .expect("sign");
        let sep = if path.contains('?') { '&' } else { '?' };
        self.client
            .request(
                method,
                format!("{}{path}{sep}api-version={api_version}", self.base),
            )
            .header("Authorization", token)
    }
}

/// Registers one symmetric-key device over HTTPS and polls until the outcome; returns the
/// final registration state (`status` is `assigned` or `failed`). Retries 429/503 as devices do.
pub fn register(
    client: &Client,
    dps: &str,
    id_scope: &str,
    registration_id: &str,
    key: &str,
    extra: Option<&Value>,
) -> Value {
    let expiry = zerotouch_service::time::now_unix() + 3600;
    let token = crate::c_sdk_device_sas(id_scope, registration_id, key, expiry);
    let mut body = serde_json::json!({"registrationId": registration_id});
    if let (Some(body), Some(Value::Object(extra))) = (body.as_object_mut(), extra) {
        body.extend(extra.clone());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut operation: Option<String> = None;
    while Instant::now() < deadline {
        let request = match &operation {
            None => client
                .put(format!(
                    "{dps}/{id_scope}/registrations/{registration_id}/register?api-version=2021-06-01"
                ))
                .json(&body),
            Some(op) => client.get(format!(
                "{dps}/{id_scope}/registrations/{registration_id}/operations/{op}?api-version=2021-06-01"
            )),
        };
        let (status, answer, _) = crate::send(request.header("Authorization", &token));
        match status {
            200 | 202 => {
                let state = answer
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if state == "assigned" || state == "failed" {
                    return answer
                        .get("registrationState")
                        .cloned()
                        .unwrap_or(Value::Null);
                }
                if let Some(op) = answer.get("operationId").and_then(Value::as_str) {
                    operation = Some(op.to_string());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            429 | 503 => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("registering {registration_id}: HTTP {other}: {answer}"),
        }
    }
    panic!("registering {registration_id}: no outcome within 60 s");
}
