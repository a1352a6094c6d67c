//! `dps_load`: a small, bounded load generator for the Zerotouch DPS device API over HTTPS.
//!
//! It sets up one enrollment group through the management API, then registers N distinct
//! registration ids with at most `--concurrency` registrations in flight. One registration is
//! `PUT /{idScope}/registrations/{id}/register` (202 `assigning`) followed by
//! `GET …/operations/{operationId}` until it answers 200 `assigned`.
//!
//! - `--mode symmetric`: group `load-sk` with a known group key; every device signs a SAS
//!   token with its derived key. By default all devices share one HTTP client (keep-alive
//!   pool); `--connection per-device` gives every device its own client, i.e. a fresh TCP +
//!   TLS connection per registration.
//! - `--mode x509`: a root CA made at start is uploaded verified as `load-root`, group
//!   `load-x509` references it, and N leaf certificates (CN = registration id, clientAuth) are
//!   made before timing. Every device has its own client with its certificate as TLS client
//!   identity, so every registration includes a TLS handshake with client authentication.
//!
//! Per-device clients are built before timing. native-tls loads the system trust store for
//! every client it builds (about 50 ms each with OpenSSL 3), so run per-device modes with
//! `SSL_CERT_FILE` pointing at the server's CA bundle to keep setup short; it does not change
//! what is measured.
//!
//! Everything is bounded: setup has its own timeout, the measured phase is abandoned after
//! `--deadline` seconds whatever happens, every request has a timeout, polling is bounded by
//! `--max-polls`, and only loopback addresses are accepted as targets. See
//! docs/performance.md for how it is run and what it measured.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use zerotouch_attestation::symmetric_key;
use zerotouch_simulate::provision::Management;
use zerotouch_tests::load::{
    Errors, cpu_seconds, host_without_port, now_unix, parse_connection_string, percentiles,
    random_key, require_loopback, reqwest_kind, round2, rss_kib, run_and_report,
};

/// The tool's name, in messages.
const TOOL: &str = "dps_load";
/// The `api-version` of the management API and of the device API requests.
const API_VERSION: &str = "2021-10-01";
/// Lifetime of every SAS token the tool signs; far longer than any bounded run.
const TOKEN_TTL_SECS: u64 = 3600;
/// Enrollment group keys: 64 bytes, the size DPS generates.
const KEY_BYTES: usize = 64;
const SK_GROUP: &str = "load-sk";
const X509_GROUP: &str = "load-x509";
const X509_ROOT: &str = "load-root";
/// How many error answers are kept verbatim for the report.
const ERROR_SAMPLES: usize = 5;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Symmetric,
    X509,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Connection {
    /// One client (keep-alive pool) for every device: mostly no handshakes in the window.
    Shared,
    /// One client per device: a new TCP + TLS connection per registration.
    PerDevice,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Bounded DPS registration load against a Zerotouch server (loopback only)")]
struct Args {
    /// provisioningserviceowner connection string:
    /// `HostName=IP:PORT;SharedAccessKeyName=…;SharedAccessKey=…`.
    #[arg(long)]
    dps_connection_string: String,
    /// The ID scope (`zerotouch credentials --json` → `idScope`).
    #[arg(long)]
    id_scope: String,
    /// The server's CA bundle (PEM), trusted for HTTPS.
    #[arg(long)]
    ca_file: PathBuf,
    /// Number of registrations (distinct registration ids).
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// Registrations (register + poll) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, value_enum, default_value_t = Mode::Symmetric)]
    mode: Mode,
    /// HTTP clients: shared (symmetric only) or one per device (always so with x509).
    #[arg(long, value_enum, default_value_t = Connection::Shared)]
    connection: Connection,
    /// Registration ids are `{prefix}-{n:05}`. Default: `{mode}-{random hex}`, so every run
    /// registers new ids.
    #[arg(long)]
    prefix: Option<String>,
    /// The server's pid: its VmRSS and CPU time are read around the measured phase.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Bound on the setup phase (group, certificates, clients), in seconds.
    #[arg(long, default_value_t = 120)]
    setup_timeout: u64,
    /// The measured phase is abandoned after this many seconds.
    #[arg(long, default_value_t = 300)]
    deadline: u64,
    /// Timeout of each HTTP request, in seconds.
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
    /// Polls per registration at most while the operation is still `assigning`.
    #[arg(long, default_value_t = 50)]
    max_polls: u32,
    /// Pause between polls that answered `assigning`, in milliseconds (the server's
    /// `retry-after` is not honoured: the tool measures the server, not the wait).
    #[arg(long, default_value_t = 20)]
    poll_interval_ms: u64,
}

// ----- clients -----------------------------------------------------------------------------

/// Clients trust only the server's CA bundle (no system store: loading it per client would
/// dominate the per-device client build).
fn client_builder(roots: &[reqwest::Certificate], timeout: u64) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(timeout))
        .tls_built_in_root_certs(false)
        .tcp_nodelay(true);
    for root in roots {
        builder = builder.add_root_certificate(root.clone());
    }
    builder
}

// ----- devices -----------------------------------------------------------------------------

/// What one device needs to register, made before the measured phase.
struct Device {
    id: String,
    /// `Authorization` for symmetric-key devices; none for X.509.
    sas: Option<String>,
    /// Its own client (per-device connections), or none to use the shared one.
    client: Option<reqwest::Client>,
}

struct Plan {
    base: String,
    id_scope: String,
    shared: reqwest::Client,
    max_polls: u32,
    poll_interval: Duration,
}

#[derive(Default)]
struct Registration {
    register_ms: f64,
    poll_ms: f64,
    total_ms: f64,
    polls: u32,
    retry_after: Option<String>,
    done_at: Option<Instant>,
}

/// One device: register, then poll until `assigned`. Errors are `kind` plus, for error
/// answers, the body.
async fn register_device(
    plan: &Plan,
    device: Device,
) -> Result<Registration, (String, Option<String>)> {
    let client = device.client.as_ref().unwrap_or(&plan.shared);
    let id = &device.id;
    let with_auth = |request: reqwest::RequestBuilder| match &device.sas {
        Some(token) => request.header("Authorization", token),
        None => request,
    };
    let started = Instant::now();
    let url = format!(
        "{}/{}/registrations/{id}/register?api-version={API_VERSION}",
        plan.base, plan.id_scope
    );
    let response = with_auth(client.put(&url).json(&json!({"registrationId": id})))
        .send()
        .await
        .map_err(|e| (format!("register:request:{}", reqwest_kind(&e)), None))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response
        .text()
        .await
        .map_err(|e| (format!("register:body:{}", reqwest_kind(&e)), None))?;
    let mut registration = Registration {
        register_ms: started.elapsed().as_secs_f64() * 1000.0,
        retry_after,
        ..Registration::default()
    };
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match (status, body["status"].as_str()) {
        (202, Some("assigning")) => {}
        // A final answer straight away (not what the HTTP API does today).
        (200, Some("assigned")) => {
            registration.total_ms = registration.register_ms;
            registration.done_at = Some(Instant::now());
            return Ok(registration);
        }
        (200 | 202, Some(other)) => return Err((format!("register:status_{other}"), Some(text))),
        (status, _) => return Err((format!("register:http_{status}"), Some(text))),
    }
    let operation_id = body["operationId"]
        .as_str()
        .ok_or_else(|| ("register:no_operation_id".to_string(), Some(text.clone())))?;

    let url = format!(
        "{}/{}/registrations/{id}/operations/{operation_id}?api-version={API_VERSION}",
        plan.base, plan.id_scope
    );
    let polling = Instant::now();
    loop {
        registration.polls += 1;
        let response = with_auth(client.get(&url))
            .send()
            .await
            .map_err(|e| (format!("poll:request:{}", reqwest_kind(&e)), None))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| (format!("poll:body:{}", reqwest_kind(&e)), None))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match (status, body["status"].as_str()) {
            (200, Some("assigned")) => break,
            (200 | 202, Some("assigning")) if registration.polls < plan.max_polls => {
                tokio::time::sleep(plan.poll_interval).await;
            }
            (200 | 202, Some("assigning")) => {
                return Err(("poll:still_assigning".to_string(), None));
            }
            (200, Some(other)) => return Err((format!("poll:status_{other}"), Some(text))),
            (status, _) => return Err((format!("poll:http_{status}"), Some(text))),
        }
    }
    registration.poll_ms = polling.elapsed().as_secs_f64() * 1000.0;
    registration.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    registration.done_at = Some(Instant::now());
    // The device's client (and its connection) closes here.
    drop(device.client);
    Ok(registration)
}

// ----- setup -------------------------------------------------------------------------------

/// Group `load-sk` with a known key, and every device's pre-signed SAS token.
async fn setup_symmetric(
    mgmt: &Management,
    id_scope: &str,
    ids: &[String],
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let group_key = random_key(KEY_BYTES);
    mgmt.put_or_replace(
        &format!("/enrollmentGroups/{SK_GROUP}"),
        &json!({
            "enrollmentGroupId": SK_GROUP,
            "attestation": {
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": random_key(KEY_BYTES)},
            },
        }),
    )
    .await
    .context("creating the symmetric-key group")?;
    let expiry = now_unix() + TOKEN_TTL_SECS;
    ids.iter()
        .map(|id| {
            let key = symmetric_key::derive_device_key(&group_key, id)
                .map_err(|e| anyhow::anyhow!("deriving a device key: {e:?}"))?;
            let token = symmetric_key::sign(
                &symmetric_key::registration_resource(id_scope, id),
                &key,
                expiry,
                None,
            )
            .map_err(|e| anyhow::anyhow!("signing a device token: {e:?}"))?;
            Ok((id.clone(), Some(token)))
        })
        .collect()
}

/// A self-signed root CA.
fn root_ca() -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "dps_load root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key)?.pem();
    Ok((pem, Issuer::new(params, key)))
}

/// A device leaf (CN = registration id, clientAuth) signed by `issuer`: (cert PEM, PKCS#8 PEM).
fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Root `load-root` (uploaded verified), group `load-x509`, and every device's client identity.
async fn setup_x509(
    mgmt: &Management,
    ids: &[String],
) -> anyhow::Result<Vec<(String, reqwest::Identity)>> {
    let (root_pem, issuer) = root_ca()?;
    mgmt.put_or_replace(
        &format!("/certificates/{X509_ROOT}"),
        &json!({"certificate": root_pem, "isVerified": true}),
    )
    .await
    .context("uploading the root CA")?;
    mgmt.put_or_replace(
        &format!("/enrollmentGroups/{X509_GROUP}"),
        &json!({
            "enrollmentGroupId": X509_GROUP,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": X509_ROOT}}},
        }),
    )
    .await
    .context("creating the X.509 group")?;
    ids.iter()
        .map(|id| {
            // The leaf alone: it is signed directly by the uploaded root.
            let (cert, key) = leaf(&issuer, id)?;
            let identity = reqwest::Identity::from_pkcs8_pem(cert.as_bytes(), key.as_bytes())?;
            Ok((id.clone(), identity))
        })
        .collect()
}

// ----- reporting ---------------------------------------------------------------------------

fn print_text(r: &Value) {
    println!("dps_load ({} mode, {} clients)", r["mode"], r["connection"]);
    println!(
        "  registrations: {} requested, {} assigned, {} failed; concurrency {}",
        r["devices"], r["assigned"], r["failed"], r["concurrency"]
    );
    println!(
        "  setup {} s; measured window {} s => {} registrations/s",
        r["setup_seconds"], r["window_seconds"], r["registrations_per_second"]
    );
    for (name, key) in [
        ("register+poll", "total_ms"),
        ("register", "register_ms"),
        ("poll", "poll_ms"),
    ] {
        let l = &r["latency"][key];
        println!(
            "  {name} ms: p50 {} p95 {} p99 {} max {}",
            l["p50"], l["p95"], l["p99"], l["max"]
        );
    }
    println!(
        "  polls per registration: {}; retry-after seen: {}",
        r["polls"], r["retry_after"]
    );
    println!("  assigned by second: {}", r["assigned_by_second"]);
    if let Some(server) = r.get("server") {
        println!(
            "  server RSS KiB: before {} after {}; CPU s in window {}",
            server["rss_before_kib"], server["rss_after_kib"], server["cpu_seconds_in_window"]
        );
    }
    println!(
        "  load generator CPU s in window {}",
        r["client_cpu_seconds"]
    );
    println!("  errors: {}", r["errors"]);
    if let Some(samples) = r["error_samples"].as_array().filter(|s| !s.is_empty()) {
        println!("  error samples: {}", Value::Array(samples.clone()));
    }
    println!("  elapsed {} s", r["elapsed_seconds"]);
}

// ----- main --------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_and_report(run(args.clone()), args.json, print_text)
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let began = Instant::now();
    let service = parse_connection_string(&args.dps_connection_string)?;
    require_loopback(host_without_port(&service.host), TOOL)?;
    if args.devices == 0 || args.concurrency == 0 {
        bail!("--devices and --concurrency must be at least 1");
    }
    let connection = match args.mode {
        // The client certificate belongs to the connection: one client per device.
        Mode::X509 => Connection::PerDevice,
        Mode::Symmetric => args.connection,
    };
    let ca_pem = std::fs::read(&args.ca_file)
        .with_context(|| format!("reading {}", args.ca_file.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&ca_pem)?;
    let base = format!("https://{}", service.host);
    let management = Management {
        http: client_builder(&roots, args.request_timeout).build()?,
        base: base.clone(),
        auth: service.service_token(TOKEN_TTL_SECS)?,
    };
    let prefix = args.prefix.clone().unwrap_or_else(|| {
        let mode = match args.mode {
            Mode::Symmetric => "sk",
            Mode::X509 => "x509",
        };
        format!("load-{mode}-{}", hex::encode(rand::random::<[u8; 3]>()))
    });
    let ids: Vec<String> = (0..args.devices)
        .map(|n| format!("{prefix}-{n:05}"))
        .collect();

    // Setup, bounded: the group, the device credentials and (per-device) the clients.
    let setup_started = Instant::now();
    let setup = async {
        let devices: Vec<Device> = match args.mode {
            Mode::Symmetric => {
                let tokens = setup_symmetric(&management, &args.id_scope, &ids).await?;
                tokens
                    .into_iter()
                    .map(|(id, sas)| {
                        let client = match connection {
                            Connection::Shared => None,
                            Connection::PerDevice => {
                                Some(client_builder(&roots, args.request_timeout).build()?)
                            }
                        };
                        Ok(Device { id, sas, client })
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            Mode::X509 => setup_x509(&management, &ids)
                .await?
                .into_iter()
                .map(|(id, identity)| {
                    let client = client_builder(&roots, args.request_timeout)
                        .identity(identity)
                        .build()?;
                    Ok(Device {
                        id,
                        sas: None,
                        client: Some(client),
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        anyhow::Ok(devices)
    };
    let devices = tokio::time::timeout(Duration::from_secs(args.setup_timeout), setup)
        .await
        .context("setup exceeded --setup-timeout")??;
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    let plan = Arc::new(Plan {
        base,
        id_scope: args.id_scope.clone(),
        shared: client_builder(&roots, args.request_timeout)
            .pool_max_idle_per_host(args.concurrency)
            .build()?,
        max_polls: args.max_polls.max(1),
        poll_interval: Duration::from_millis(args.poll_interval_ms),
    });

    // The measured phase.
    let server_rss_before = args.server_pid.and_then(|pid| rss_kib(pid).ok());
    let server_cpu_before = args.server_pid.and_then(cpu_seconds);
    let client_cpu_before = cpu_seconds(std::process::id());
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let hard_deadline = started + Duration::from_secs(args.deadline);
    let mut tasks = JoinSet::new();
    for device in devices {
        let (plan, gate) = (plan.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            register_device(&plan, device).await
        });
    }
    let mut errors = Errors::default();
    let mut samples = Vec::new();
    let mut done = Vec::with_capacity(args.devices);
    loop {
        match tokio::time::timeout_at(hard_deadline.into(), tasks.join_next()).await {
            Ok(Some(Ok(Ok(registration)))) => done.push(registration),
            Ok(Some(Ok(Err((kind, body))))) => {
                if let Some(body) = body
                    && samples.len() < ERROR_SAMPLES
                {
                    samples.push(json!({"kind": kind, "body": body}));
                }
                errors.add(kind);
            }
            Ok(Some(Err(_))) => errors.add("task_panicked"),
            Ok(None) => break,
            Err(_) => {
                for _ in 0..tasks.len() {
                    errors.add("deadline:abandoned");
                }
                tasks.abort_all();
                break;
            }
        }
    }
    // The window ends with the last successful registration (or now, if none succeeded).
    let window_end = done
        .iter()
        .filter_map(|r| r.done_at)
        .max()
        .unwrap_or_else(Instant::now);
    let window = window_end.saturating_duration_since(started).as_secs_f64();
    let server_cpu_after = args.server_pid.and_then(cpu_seconds);
    let server_rss_after = args.server_pid.and_then(|pid| rss_kib(pid).ok());
    let client_cpu_after = cpu_seconds(std::process::id());

    let mut by_second = vec![0u64; window.ceil() as usize + 1];
    for at in done.iter().filter_map(|r| r.done_at) {
        let second = at.saturating_duration_since(started).as_secs() as usize;
        if let Some(bin) = by_second.get_mut(second) {
            *bin += 1;
        }
    }
    while by_second.len() > 1 && by_second.last() == Some(&0) {
        by_second.pop();
    }
    let mut polls = BTreeMap::new();
    for r in &done {
        *polls.entry(r.polls.to_string()).or_insert(0u64) += 1;
    }
    let mut retry_after = BTreeMap::new();
    for r in &done {
        let value = r.retry_after.clone().unwrap_or_else(|| "none".into());
        *retry_after.entry(value).or_insert(0u64) += 1;
    }
    let assigned = done.len();
    let failed: u64 = errors.0.values().sum();
    let mut report = json!({
        "mode": match args.mode { Mode::Symmetric => "symmetric", Mode::X509 => "x509" },
        "connection": match connection {
            Connection::Shared => "shared",
            Connection::PerDevice => "per-device",
        },
        "prefix": prefix,
        "devices": args.devices,
        "concurrency": args.concurrency,
        "assigned": assigned,
        "failed": failed,
        "setup_seconds": round2(setup_seconds),
        "window_seconds": round2(window),
        "registrations_per_second": if window > 0.0 {
            (assigned as f64 / window * 10.0).round() / 10.0
        } else {
            0.0
        },
        "latency": {
            "total_ms": percentiles(done.iter().map(|r| r.total_ms).collect()),
            "register_ms": percentiles(done.iter().map(|r| r.register_ms).collect()),
            "poll_ms": percentiles(done.iter().map(|r| r.poll_ms).collect()),
        },
        "polls": polls,
        "retry_after": retry_after,
        "assigned_by_second": by_second,
        "client_cpu_seconds": match (client_cpu_before, client_cpu_after) {
            (Some(b), Some(a)) => Some(round2(a - b)),
            _ => None,
        },
        "errors": errors.0,
        "error_samples": samples,
        "elapsed_seconds": round2(began.elapsed().as_secs_f64()),
    });
    if let Some(pid) = args.server_pid {
        report["server"] = json!({
            "pid": pid,
            "rss_before_kib": server_rss_before,
            "rss_after_kib": server_rss_after,
            "cpu_seconds_in_window": match (server_cpu_before, server_cpu_after) {
                (Some(b), Some(a)) => Some(round2(a - b)),
                _ => None,
            },
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_root() {
        let (root_pem, issuer) = root_ca().expect("root");
        let (leaf_pem, key_pem) = leaf(&issuer, "dev-1").expect("leaf");
        assert!(root_pem.contains("BEGIN CERTIFICATE"));
        assert!(leaf_pem.contains("BEGIN CERTIFICATE"));
        assert!(key_pem.starts_with("-----BEGIN") && key_pem.contains("PRIVATE KEY"));
        assert!(reqwest::Identity::from_pkcs8_pem(leaf_pem.as_bytes(), key_pem.as_bytes()).is_ok());
    }
}
