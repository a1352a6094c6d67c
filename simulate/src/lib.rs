//! `zerotouch simulate`: N simulated devices provision through DPS (symmetric key, individual or
//! group, or X.509; optionally with a CSR for an issued certificate; over MQTT or HTTPS), connect
//! to their assigned hub, and send QoS 1 telemetry and reported twin patches for a bounded time.
//! It prints progress to stderr every second and a summary (throughput, latency percentiles,
//! errors by kind) to stdout, as text or JSON.
//!
//! It is a client of a running server: the management API sets up enrollments, the device APIs
//! do the rest. From `zerotouch-service` it takes only the command line's `Remote` options and
//! the local credentials (`cli::credentials`, as `zerotouch credentials` prints them), never
//! the server. It is a crate of its own so that the server library does not carry a client MQTT
//! stack (rumqttc's client over native-tls); the `zerotouch` binary (package `zerotouch`) adds
//! this verb to the service's command line.
//!
//! What it must never do: target a non-loopback address unless the operator named the host
//! (`--host`), or run without bounds: every phase is bounded in count and time.
//!
//! `stats` and `mqtt` are shared with the load tools of the `tests` package (`hub_load`,
//! `dps_load`).
#![forbid(unsafe_code)]

pub mod hub;
pub mod mqtt;
pub mod provision;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use hub::{Counters, HubPlan, HubReport, Window};
use provision::{Attestation, DpsTransport, Management, RegisterPlan, Target};
use stats::{Errors, percentiles, round2};
use zerotouch_service::bootstrap;
use zerotouch_service::cli::Remote;

/// Limits that keep a run bounded whatever the flags say.
const MAX_DEVICES: usize = 100_000;
const MAX_DURATION_SECS: u64 = 3600;
const MAX_RATE: f64 = 1000.0;

#[derive(Debug, Args, Clone)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Seconds of telemetry once every device is connected; 0 = provision only.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// QoS 1 telemetry messages per second per device.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Reported twin patches per second per device.
    #[arg(long, default_value_t = 0.2)]
    pub twin_rate: f64,
    /// Telemetry payload size in bytes (a JSON body padded up to it).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// How the devices prove who they are.
    #[arg(long, value_enum, default_value_t = Attestation::SymmetricKeyGroup)]
    pub attestation: Attestation,
    /// Send a CSR with the registration and use the issued certificate at the hub.
    #[arg(long)]
    pub csr: bool,
    /// The DPS device API transport.
    #[arg(long, value_enum, default_value_t = DpsTransport::Mqtt)]
    pub transport: DpsTransport,
    /// The server's host, for HTTPS and MQTT. Default: the connection string's or the local
    /// configuration's host. Needed to target anything but a loopback address.
    #[arg(long)]
    pub host: Option<String>,
    /// The MQTT port (DPS and hub). Default: the local configuration's `listen.mqtt` port.
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// Dial this host for the hub instead of the assigned hub's name.
    #[arg(long)]
    pub hub_host: Option<String>,
    /// The ID scope. Default: the local instance's (needed with --connection-string).
    #[arg(long)]
    pub id_scope: Option<String>,
    /// Registrations and hub connects in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Registration ids are `{prefix}-{n:05}`. Default: `sim-{random hex}`, new every run.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Bound on setup, provisioning and connecting, in seconds.
    #[arg(long, default_value_t = 120)]
    pub setup_timeout: u64,
    /// Seconds to wait for outstanding answers after the telemetry window.
    #[arg(long, default_value_t = 10)]
    pub drain: u64,
    /// Timeout of each request and connect, in seconds.
    #[arg(long, default_value_t = 30)]
    pub request_timeout: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs the simulation on a runtime of its own and returns the summary (what `--json` prints).
pub fn report(args: SimulateArgs) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(simulate(args));
    // Tasks still running past the hard deadline are abandoned, not awaited.
    runtime.shutdown_timeout(Duration::from_secs(1));
    report
}

/// Runs the simulation, prints the summary, and fails if any device failed.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let json = args.json;
    let report = report(args)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    let errors: u64 = report["errors"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    if errors > 0 {
        bail!("{errors} error(s) during the simulation (see \"errors\" above)");
    }
    Ok(())
}

fn check_args(args: &SimulateArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > MAX_DEVICES {
        bail!("--devices must be between 1 and {MAX_DEVICES}");
    }
    if args.duration > MAX_DURATION_SECS {
        bail!("--duration must be at most {MAX_DURATION_SECS} seconds");
    }
    for (flag, rate) in [("--rate", args.rate), ("--twin-rate", args.twin_rate)] {
        if !rate.is_finite() || !(0.0..=MAX_RATE).contains(&rate) {
            bail!("{flag} must be between 0 and {MAX_RATE} per second per device");
        }
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.payload_bytes > 256 * 1024 {
        bail!("--payload-bytes must be at most 262144 (IoT Hub's message limit)");
    }
    if args.setup_timeout == 0 || args.request_timeout == 0 {
        bail!("--setup-timeout and --request-timeout must be at least 1 second");
    }
    Ok(())
}

/// What the simulator needs of the server: where it is, the owner policy and the ID scope.
struct Resolved {
    target: Target,
    /// `HostName` of the management API (host:port) and the owner policy's name and key.
    api_host: String,
    policy: String,
    key: String,
}

/// From `--connection-string` (with `--id-scope` and `--ca-file`) or from the local data dir
/// and configuration, as `zerotouch credentials` reads them.
fn resolve(args: &SimulateArgs) -> anyhow::Result<Resolved> {
    let settings = args.remote.local.settings()?;
    let local =
        || zerotouch_service::cli::credentials(&settings).context("reading the local instance");
    let (api_host, policy, key, id_scope, ca_file, mqtt_port) = match &args.remote.connection_string
    {
        Some(cs) => {
            let (host, policy, key) =
                bootstrap::parse_connection_string(cs).map_err(anyhow::Error::msg)?;
            let Some(id_scope) = args.id_scope.clone() else {
                bail!("--id-scope is required with --connection-string");
            };
            let ca_file = match &args.remote.ca_file {
                Some(f) => f.clone(),
                None => bootstrap::Paths::new(&settings.service.data_dir).ca_bundle,
            };
            (
                host,
                policy,
                key,
                id_scope,
                ca_file,
                settings.listen.mqtt.port(),
            )
        }
        None => {
            let credentials = local()?;
            let cs = credentials["dpsConnectionString"]
                .as_str()
                .context("no dpsConnectionString")?;
            let (host, policy, key) =
                bootstrap::parse_connection_string(cs).map_err(anyhow::Error::msg)?;
            let ca_file = match &args.remote.ca_file {
                Some(f) => f.clone(),
                None => credentials["caBundlePath"]
                    .as_str()
                    .context("no caBundlePath")?
                    .into(),
            };
            let id_scope = match &args.id_scope {
                Some(scope) => scope.clone(),
                None => credentials["idScope"]
                    .as_str()
                    .context("no idScope")?
                    .to_string(),
            };
            (
                host,
                policy,
                key,
                id_scope,
                ca_file,
                settings.listen.mqtt.port(),
            )
        }
    };
    let https_port = match api_host.rsplit_once(':') {
        Some((_, port)) if !port.contains(']') => port
            .parse()
            .with_context(|| format!("the port of HostName {api_host:?}"))?,
        _ => 443,
    };
    let host = args
        .host
        .clone()
        .unwrap_or_else(|| stats::host_without_port(&api_host).to_string());
    let ca_pem = std::fs::read(&ca_file)
        .with_context(|| format!("reading the CA bundle {}", ca_file.display()))?;
    Ok(Resolved {
        target: Target {
            host,
            https_port,
            mqtt_port: args.mqtt_port.unwrap_or(mqtt_port),
            id_scope,
            ca_pem,
        },
        api_host,
        policy,
        key,
    })
}

/// Without `--host`, every address the target resolves to must be loopback.
async fn check_target(args: &SimulateArgs, target: &Target) -> anyhow::Result<()> {
    if args.host.is_some() {
        return Ok(());
    }
    for host in std::iter::once(&target.host).chain(args.hub_host.iter()) {
        let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), target.https_port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .collect();
        if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
            bail!(
                "{host} is not a loopback address; zerotouch simulate only targets this machine \
                 unless you name the host with --host"
            );
        }
    }
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<Value> {
    check_args(&args)?;
    let began = Instant::now();
    let resolved = resolve(&args)?;
    check_target(&args, &resolved.target).await?;
    let target = Arc::new(resolved.target);
    let roots = reqwest::Certificate::from_pem_bundle(&target.ca_pem)
        .context("the CA bundle holds no PEM certificate")?;
    if roots.is_empty() {
        bail!("the CA bundle holds no certificate");
    }
    let request_timeout = Duration::from_secs(args.request_timeout);
    let client = || {
        let mut builder = reqwest::Client::builder()
            .timeout(request_timeout)
            .tls_built_in_root_certs(false)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(args.concurrency);
        for root in &roots {
            builder = builder.add_root_certificate(root.clone());
        }
        builder.build()
    };
    let auth = zerotouch_attestation::symmetric_key::sign(
        &resolved.api_host,
        &resolved.key,
        zerotouch_service::time::now_unix() + provision::TOKEN_TTL_SECS,
        Some(&resolved.policy),
    )
    .map_err(|e| anyhow::anyhow!("signing the management token: {e}"))?;
    let management = Management {
        http: client()?,
        base: target.https_base(),
        auth,
    };
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("sim-{}", hex::encode(rand::random::<[u8; 3]>())));
    let ids: Vec<String> = (0..args.devices)
        .map(|n| format!("{prefix}-{n:05}"))
        .collect();

    let counters = Arc::new(Counters::default());
    let ticker = (!args.quiet).then(|| {
        tokio::spawn(progress_lines(
            counters.clone(),
            args.devices as u64,
            Instant::now(),
        ))
    });

    // Setup: enrollments and device credentials, bounded.
    let setup_deadline = Instant::now() + Duration::from_secs(args.setup_timeout);
    let devices = tokio::time::timeout_at(
        setup_deadline.into(),
        provision::setup(&management, args.attestation, &ids, args.concurrency),
    )
    .await
    .context("setting up enrollments exceeded --setup-timeout")?
    .with_context(|| {
        format!(
            "setting up enrollments at {} (is `zerotouch serve` running?)",
            management.base
        )
    })?;
    let setup_seconds = began.elapsed().as_secs_f64();

    let shared_connector = mqtt::connector(&target.ca_pem, None, true)?;
    let register_plan = Arc::new(RegisterPlan {
        target: target.clone(),
        transport: args.transport,
        csr: args.csr,
        shared_connector: shared_connector.clone(),
        shared_http: client()?,
        roots: roots.clone(),
        request_timeout,
        max_attempts: 20,
    });
    let hard_deadline =
        setup_deadline + Duration::from_secs(args.duration + args.drain) + Duration::from_secs(10);
    let hub_plan = Arc::new(HubPlan {
        mqtt_port: target.mqtt_port,
        hub_host: args.hub_host.clone(),
        ca_pem: target.ca_pem.clone(),
        shared_connector,
        rate: args.rate,
        twin_rate: args.twin_rate,
        payload_bytes: args.payload_bytes,
        connect_timeout: request_timeout,
        loopback_only: args.host.is_none(),
        counters: counters.clone(),
        hard_deadline,
    });

    // Every device: provision, then (with a duration) connect to its hub and run the window.
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let (connected_tx, mut connected_rx) = mpsc::channel::<bool>(args.devices.max(1));
    let (window_tx, window_rx) = watch::channel(None::<Window>);
    let provision_started = Instant::now();
    let run_hub = args.duration > 0;
    let mut tasks = JoinSet::new();
    for device in devices {
        let (register_plan, hub_plan, gate, connected, window, counters) = (
            register_plan.clone(),
            hub_plan.clone(),
            gate.clone(),
            connected_tx.clone(),
            window_rx.clone(),
            counters.clone(),
        );
        tasks.spawn(async move {
            let registered = {
                let _permit = gate.acquire().await;
                let deadline = setup_deadline;
                match tokio::time::timeout_at(
                    deadline.into(),
                    provision::register(&register_plan, &device),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err("register:setup_timeout".to_string()),
                }
            };
            let assignment = match registered {
                Ok(a) => {
                    counters.provisioned.fetch_add(1, Ordering::Relaxed);
                    a
                }
                Err(kind) => {
                    counters.provision_failed.fetch_add(1, Ordering::Relaxed);
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    let _ = connected.send(false).await;
                    return DeviceOutcome {
                        provision: Err(kind),
                        done_at: Instant::now(),
                        hub: None,
                    };
                }
            };
            let latency = assignment.latency_ms;
            let done_at = Instant::now();
            let hub = if run_hub {
                Some(hub::run_device(hub_plan, assignment, gate, connected, window).await)
            } else {
                let _ = connected.send(true).await;
                None
            };
            DeviceOutcome {
                provision: Ok(latency),
                done_at,
                hub,
            }
        });
    }
    drop(connected_tx);

    // Wait until every device has connected (or failed), bounded by the setup deadline.
    let mut errors = Errors::default();
    let mut reported = 0usize;
    while reported < args.devices {
        match tokio::time::timeout_at(setup_deadline.into(), connected_rx.recv()).await {
            Ok(Some(_)) => reported += 1,
            Ok(None) => break,
            Err(_) => {
                errors.add("deadline:setup");
                break;
            }
        }
    }
    let ready_seconds = provision_started.elapsed().as_secs_f64();
    let connected = counters.connected.load(Ordering::Relaxed);
    let start = Instant::now() + Duration::from_millis(100);
    let window = Window {
        start,
        end: start + Duration::from_secs(args.duration),
        drain_until: start + Duration::from_secs(args.duration + args.drain),
    };
    if run_hub {
        let _ = window_tx.send(Some(window));
    }

    let mut provision_ms = Vec::new();
    let mut last_assigned: Option<Instant> = None;
    let mut hub_reports: Vec<HubReport> = Vec::new();
    loop {
        match tokio::time::timeout_at(hard_deadline.into(), tasks.join_next()).await {
            Ok(Some(Ok(outcome))) => {
                match outcome.provision {
                    Ok(ms) => {
                        provision_ms.push(ms);
                        last_assigned = last_assigned.max(Some(outcome.done_at));
                    }
                    Err(kind) => errors.add(kind),
                }
                hub_reports.extend(outcome.hub);
            }
            Ok(Some(Err(_))) => errors.add("device:task_panicked"),
            Ok(None) => break,
            Err(_) => {
                for _ in 0..tasks.len() {
                    errors.add("deadline:abandoned_device");
                }
                tasks.abort_all();
                break;
            }
        }
    }
    if let Some(ticker) = ticker {
        ticker.abort();
    }

    let provisioned = provision_ms.len();
    let provision_window = last_assigned
        .map(|at| {
            at.saturating_duration_since(provision_started)
                .as_secs_f64()
        })
        .unwrap_or(0.0);
    let mut connect_ms = Vec::new();
    let (mut ack_ms, mut twin_ms) = (Vec::new(), Vec::new());
    let (mut sent, mut acked, mut acked_in_window) = (0u64, 0u64, 0u64);
    let (mut twin_sent, mut twin_acked, mut twin_in_window) = (0u64, 0u64, 0u64);
    for r in hub_reports {
        connect_ms.extend(r.connect_ms);
        ack_ms.extend(r.ack_latency_us.iter().map(|&us| f64::from(us) / 1000.0));
        twin_ms.extend(r.twin_latency_us.iter().map(|&us| f64::from(us) / 1000.0));
        sent += r.sent;
        acked += r.acked;
        acked_in_window += r.acked_in_window;
        twin_sent += r.twin_sent;
        twin_acked += r.twin_acked;
        twin_in_window += r.twin_acked_in_window;
        errors.merge(r.errors);
    }
    let per_second = |count: u64, seconds: f64| {
        if seconds > 0.0 {
            round2(count as f64 / seconds)
        } else {
            0.0
        }
    };
    let duration = args.duration as f64;
    Ok(json!({
        "target": {
            "host": target.host,
            "https_port": target.https_port,
            "mqtt_port": target.mqtt_port,
            "id_scope": target.id_scope,
        },
        "prefix": prefix,
        "devices": {
            "requested": args.devices,
            "provisioned": provisioned,
            "connected": connected,
        },
        "setup_seconds": round2(setup_seconds),
        "provisioning": {
            "attestation": args.attestation.name(),
            "transport": match args.transport { DpsTransport::Mqtt => "mqtt", DpsTransport::Https => "https" },
            "csr": args.csr,
            "concurrency": args.concurrency,
            "seconds": round2(provision_window),
            "per_second": per_second(provisioned as u64, provision_window),
            "latency_ms": percentiles(provision_ms),
        },
        "connect": {
            "phase_seconds": round2(ready_seconds),
            "latency_ms": percentiles(connect_ms),
        },
        "telemetry": {
            "rate_per_device": args.rate,
            "duration_seconds": args.duration,
            "offered_per_second": round2(args.rate * connected as f64),
            "sent": sent,
            "acked": acked,
            "acked_in_window": acked_in_window,
            "acked_per_second": per_second(acked_in_window, duration),
            "latency_ms": percentiles(ack_ms),
        },
        "twin": {
            "rate_per_device": args.twin_rate,
            "sent": twin_sent,
            "acked": twin_acked,
            "acked_per_second": per_second(twin_in_window, duration),
            "latency_ms": percentiles(twin_ms),
        },
        "errors": errors.0,
        "elapsed_seconds": round2(began.elapsed().as_secs_f64()),
    }))
}

struct DeviceOutcome {
    /// The registration's latency in ms, or its error kind.
    provision: Result<f64, String>,
    done_at: Instant,
    hub: Option<HubReport>,
}

/// One line a second on stderr until aborted.
async fn progress_lines(counters: Arc<Counters>, devices: u64, started: Instant) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    let mut last_acked = 0u64;
    loop {
        ticks.tick().await;
        let c = &counters;
        let acked = c.telemetry_acked.load(Ordering::Relaxed);
        eprintln!(
            "simulate {:>5.1}s  provisioned {}/{} ({} failed)  connected {}  telemetry acked {} (+{}/s)  twin acked {}  errors {}",
            started.elapsed().as_secs_f64(),
            c.provisioned.load(Ordering::Relaxed),
            devices,
            c.provision_failed.load(Ordering::Relaxed),
            c.connected.load(Ordering::Relaxed),
            acked,
            acked - last_acked.min(acked),
            c.twin_acked.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
        );
        last_acked = acked;
    }
}

fn print_text(r: &Value) {
    let l = |v: &Value| {
        format!(
            "p50 {} p95 {} p99 {} max {}",
            v["p50"], v["p95"], v["p99"], v["max"]
        )
    };
    let p = &r["provisioning"];
    println!(
        "zerotouch simulate: {} devices against {}:{} (https) / {} (mqtt), ID scope {}",
        r["devices"]["requested"],
        r["target"]["host"].as_str().unwrap_or_default(),
        r["target"]["https_port"],
        r["target"]["mqtt_port"],
        r["target"]["id_scope"].as_str().unwrap_or_default(),
    );
    println!(
        "  provisioning ({}, over {}{}): {} assigned in {} s = {}/s; latency ms {}",
        p["attestation"].as_str().unwrap_or_default(),
        p["transport"].as_str().unwrap_or_default(),
        if p["csr"] == true { ", with CSR" } else { "" },
        r["devices"]["provisioned"],
        p["seconds"],
        p["per_second"],
        l(&p["latency_ms"]),
    );
    println!(
        "  hub connect: {} connected; latency ms {}",
        r["devices"]["connected"],
        l(&r["connect"]["latency_ms"])
    );
    let t = &r["telemetry"];
    println!(
        "  telemetry: {} sent, {} acked in {} s = {} msg/s (offered {}/s); ack latency ms {}",
        t["sent"],
        t["acked"],
        t["duration_seconds"],
        t["acked_per_second"],
        t["offered_per_second"],
        l(&t["latency_ms"]),
    );
    let w = &r["twin"];
    println!(
        "  twin reported patches: {} sent, {} acknowledged = {}/s; latency ms {}",
        w["sent"],
        w["acked"],
        w["acked_per_second"],
        l(&w["latency_ms"]),
    );
    let errors = r["errors"].as_object().filter(|e| !e.is_empty());
    match errors {
        None => println!("  errors: none"),
        Some(errors) => {
            println!("  errors:");
            for (kind, count) in errors {
                println!("    {kind}: {count}");
            }
        }
    }
    println!(
        "  devices are {}-NNNNN; elapsed {} s",
        r["prefix"].as_str().unwrap_or_default(),
        r["elapsed_seconds"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(extra: &[&str]) -> SimulateArgs {
        let mut argv = vec!["simulate"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).expect("parses").args
    }

    #[test]
    fn bounds_are_checked() {
        assert!(check_args(&parse(&[])).is_ok());
        for bad in [
            &["--devices", "0"][..],
            &["--rate=-1"],
            &["--twin-rate", "NaN"],
            &["--duration", "100000"],
            &["--concurrency", "0"],
        ] {
            assert!(check_args(&parse(bad)).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn remote_targets_need_host() {
        let args = parse(&[]);
        let target = |host: &str| Target {
            host: host.into(),
            https_port: 8443,
            mqtt_port: 8883,
            id_scope: "0ne00000001".into(),
            ca_pem: Vec::new(),
        };
        assert!(check_target(&args, &target("127.0.0.1")).await.is_ok());
        assert!(check_target(&args, &target("localhost")).await.is_ok());
        let err = check_target(&args, &target("10.1.2.3"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("--host"), "{err}");
        let explicit = parse(&["--host", "10.1.2.3"]);
        assert!(check_target(&explicit, &target("10.1.2.3")).await.is_ok());
    }
}
