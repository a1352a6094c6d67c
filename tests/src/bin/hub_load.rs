//! `hub_load`: a small, bounded MQTT load generator for the Zerotouch hub.
//!
//! It creates (or reuses) N SAS devices through the hub's service API, connects N TLS MQTT
//! clients (at most `--handshakes` TLS handshakes in flight, one shared native-tls connector),
//! then has every device publish QoS 1 telemetry at `--rate` messages per second for
//! `--duration` seconds and counts the PUBACKs. With `--rate 0` the devices only connect and
//! stay idle, which together with `--server-pid` measures the server's memory per connection.
//!
//! Everything is bounded: setup has its own timeout, the MQTT phase ends after
//! `--duration` + `--deadline-slack` seconds whatever happens, and only loopback addresses are
//! accepted as targets. See docs/performance.md for how it is run and what it measured.
//!
//! With `--probe-connects N`, N more devices connect and disconnect again and again through
//! the telemetry window, alternating CleanSession=1 and 0, and the report gives their
//! CONNECT→CONNACK latency under that load.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rumqttc::tokio_native_tls::native_tls;
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use zerotouch_attestation::symmetric_key;
use zerotouch_simulate::mqtt::{connect, connection_error_kind, connector};
use zerotouch_tests::load::{
    Errors, cpu_seconds, host_without_port, now_unix, parse_connection_string, percentiles,
    random_key, require_loopback, reqwest_kind, round2, rss_kib, run_and_report,
};

/// The tool's name, in messages.
const TOOL: &str = "hub_load";
const HUB_API_VERSION: &str = "2021-04-12";
const MQTT_API_VERSION: &str = "2019-10-01";
/// Lifetime of every SAS token the tool signs; far longer than any bounded run.
const TOKEN_TTL_SECS: u64 = 3600;
/// Device keys: 32 bytes, the size IoT Hub generates.
const DEVICE_KEY_BYTES: usize = 32;

#[derive(Parser, Debug, Clone)]
#[command(about = "Bounded MQTT telemetry load against a Zerotouch hub (loopback only)")]
struct Args {
    /// iothubowner connection string: `HostName=IP:PORT;SharedAccessKeyName=…;SharedAccessKey=…`.
    #[arg(long, required_unless_present = "broker")]
    hub_connection_string: Option<String>,
    /// The server's CA bundle (PEM), trusted for HTTPS and MQTT.
    #[arg(long, required_unless_present = "broker")]
    ca_file: Option<PathBuf>,
    /// Load a plain MQTT broker instead of the hub, e.g. Mosquitto at `127.0.0.1:1883`: the
    /// same clients, topics, QoS, rate and window, but plain TCP, no credentials and no device
    /// creation. For comparing the hub's durable ingest with a broker's QoS 1.
    #[arg(long, conflicts_with_all = ["hub_connection_string", "ca_file", "delete_devices"])]
    broker: Option<String>,
    /// MQTT addresses to dial, comma-separated; each device dials one of them, chosen by its
    /// id. Default: the HostName without its port. One source and destination address pair
    /// has about 28,000 ephemeral ports: against a server listening on 0.0.0.0, several
    /// loopback addresses (127.0.0.2,127.0.0.3,…) carry 100,000 connections.
    #[arg(long)]
    mqtt_host: Option<String>,
    #[arg(long, default_value_t = 8883)]
    mqtt_port: u16,
    /// Number of devices (created if missing, then connected).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Seconds of telemetry (or of idling with `--rate 0`).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// QoS 1 messages per second per device; 0 = connect only and stay idle.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// The server's pid: its VmRSS is read before connecting and once all are connected.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Device ids are `{prefix}-{n:05}`; existing devices are reused.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// TLS handshakes (MQTT connects) in flight at once.
    #[arg(long, default_value_t = 64)]
    handshakes: usize,
    /// Device-creation requests in flight at once.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// Bound on the setup phase (device creation), in seconds.
    #[arg(long, default_value_t = 120)]
    setup_timeout: u64,
    /// The MQTT phase is abandoned `duration + slack` seconds after it starts.
    #[arg(long, default_value_t = 60)]
    deadline_slack: u64,
    /// Seconds to wait for outstanding PUBACKs after the telemetry window.
    #[arg(long, default_value_t = 10)]
    drain: u64,
    /// Delete the devices again at the end.
    #[arg(long)]
    delete_devices: bool,
    /// Devices that reconnect through the telemetry window (hub only), for connect latency
    /// under load.
    #[arg(long, default_value_t = 0)]
    probe_connects: usize,
    /// Milliseconds between two probe connects.
    #[arg(long, default_value_t = 100)]
    probe_interval_ms: u64,
}

// ----- setup: devices through the service API -----------------------------------------------

fn https_client(ca_pem: &[u8]) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64);
    for certificate in reqwest::Certificate::from_pem_bundle(ca_pem)? {
        builder = builder.add_root_certificate(certificate);
    }
    Ok(builder.build()?)
}

/// Creates the device, or reads its key if it already exists. Returns its primary key.
async fn ensure_device(
    client: &reqwest::Client,
    base: &str,
    auth: &str,
    id: &str,
) -> Result<String, String> {
    let url = format!("{base}/devices/{id}?api-version={HUB_API_VERSION}");
    let key = random_key(DEVICE_KEY_BYTES);
    let body = json!({
        "deviceId": id,
        "authentication": {
            "type": "sas",
            "symmetricKey": {"primaryKey": key, "secondaryKey": random_key(DEVICE_KEY_BYTES)},
        },
    });
    let response = client
        .put(&url)
        .header("Authorization", auth)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("create:request:{}", reqwest_kind(&e)))?;
    match response.status().as_u16() {
        200 | 201 => Ok(key),
        409 => {
            let response = client
                .get(&url)
                .header("Authorization", auth)
                .send()
                .await
                .map_err(|e| format!("get:request:{}", reqwest_kind(&e)))?;
            let status = response.status().as_u16();
            if status != 200 {
                return Err(format!("get:http_{status}"));
            }
            let device: Value = response
                .json()
                .await
                .map_err(|_| "get:bad_json".to_string())?;
            device["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "get:no_sas_key".to_string())
        }
        status => Err(format!("create:http_{status}")),
    }
}

async fn delete_device(client: &reqwest::Client, base: &str, auth: &str, id: &str) -> bool {
    let url = format!("{base}/devices/{id}?api-version={HUB_API_VERSION}");
    client
        .delete(&url)
        .header("Authorization", auth)
        .header("If-Match", "\"*\"")
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Creates or looks up `ids` with at most `concurrency` requests in flight.
async fn ensure_devices(
    client: &reqwest::Client,
    base: &str,
    auth: &str,
    ids: &[String],
    concurrency: usize,
    errors: &mut Errors,
) -> Vec<(String, String)> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for id in ids {
        let (client, base, auth, id, gate) = (
            client.clone(),
            base.to_string(),
            auth.to_string(),
            id.clone(),
            gate.clone(),
        );
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let result = ensure_device(&client, &base, &auth, &id).await;
            (id, result)
        });
    }
    let mut devices = Vec::with_capacity(ids.len());
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((id, Ok(key))) => devices.push((id, key)),
            Ok((_, Err(kind))) => errors.add(kind),
            Err(_) => errors.add("create:task_panicked"),
        }
    }
    devices.sort();
    devices
}

// ----- MQTT devices ------------------------------------------------------------------------

impl Plan {
    /// The MQTT address device `id` dials: one of `mqtt_hosts`, by an FNV-1a hash of the id.
    fn mqtt_host_for(&self, id: &str) -> String {
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let index = usize::try_from(hash % self.mqtt_hosts.len() as u64).unwrap_or(0);
        self.mqtt_hosts[index].clone()
    }
}

/// Settings every device task shares.
struct Plan {
    hub_host: String,
    /// Never empty.
    mqtt_hosts: Vec<String>,
    mqtt_port: u16,
    /// None: plain TCP without credentials (`--broker`).
    connector: Option<native_tls::TlsConnector>,
    rate: f64,
    payload: Vec<u8>,
    /// Connect timeout for TCP + TLS + CONNACK, in seconds.
    connect_timeout: u64,
    /// Nothing of the MQTT phase outlives this.
    hard_deadline: Instant,
    /// PUBACKs per second since the window's start (the last bin takes the rest): a stall
    /// shows up as a dip.
    acks_by_second: Vec<AtomicU64>,
}

/// When the telemetry window runs, shared with every device once all have connected.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
    /// Give up on PUBACKs still outstanding after this.
    drain_until: Instant,
}

#[derive(Default)]
struct DeviceReport {
    connect_ms: Option<f64>,
    sent: u64,
    acked: u64,
    acked_in_window: u64,
    ack_latency_us: Vec<u32>,
    errors: Errors,
}

/// Counters the publisher reads to know when every PUBACK is in.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    /// Set when the event loop has stopped (error, disconnect or deadline).
    closed: AtomicBool,
}

fn mqtt_options(
    plan: &Plan,
    id: &str,
    key: &str,
    clean_session: bool,
) -> Result<MqttOptions, String> {
    let resource = format!("{}/devices/{id}", plan.hub_host);
    let token = match plan.connector {
        Some(_) => symmetric_key::sign(&resource, key, now_unix() + TOKEN_TTL_SECS, None)
            .map_err(|_| "sign:bad_key".to_string())?,
        None => String::new(),
    };
    let mut options = MqttOptions::new(id, plan.mqtt_host_for(id), plan.mqtt_port);
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(clean_session);
    if let Some(connector) = &plan.connector {
        options
            .set_credentials(
                format!("{}/{id}/?api-version={MQTT_API_VERSION}", plan.hub_host),
                token,
            )
            .set_transport(Transport::tls_with_config(
                TlsConfiguration::NativeConnector(connector.clone()),
            ));
    }
    Ok(options)
}

/// One device: connect (holding a handshake permit), report the outcome, then wait for the
/// window, publish through it, drain, and disconnect.
async fn run_device(
    plan: Arc<Plan>,
    id: String,
    key: String,
    handshakes: Arc<Semaphore>,
    connected: mpsc::Sender<bool>,
    window: watch::Receiver<Option<Window>>,
) -> DeviceReport {
    let mut report = DeviceReport::default();
    let options = match mqtt_options(&plan, &id, &key, false) {
        Ok(o) => o,
        Err(kind) => {
            report.errors.add(kind);
            let _ = connected.send(false).await;
            return report;
        }
    };
    // Capacity bounds the client-side queue; overflow is counted as `publish:queue_full`.
    let queue = ((plan.rate * 2.0) as usize).clamp(16, 1024);
    let (client, mut eventloop) = AsyncClient::new(options, queue);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(plan.connect_timeout);
    eventloop.set_network_options(network);

    // Connect with a handshake permit held.
    let ok = match connect(&mut eventloop, &handshakes, "connect").await {
        Ok(ms) => {
            report.connect_ms = Some(ms);
            true
        }
        Err(kind) => {
            report.errors.add(kind);
            false
        }
    };
    let _ = connected.send(ok).await;
    if !ok {
        return report;
    }

    let progress = Arc::new(Progress::default());
    let publisher = tokio::spawn(publish(
        plan.clone(),
        id.clone(),
        client.clone(),
        progress.clone(),
        window.clone(),
    ));

    // The event loop: the only place that polls the connection. It is never cancelled
    // mid-poll except by its deadline (rumqttc's poll is not cancel-safe while writing).
    let mut sent_at: HashMap<u16, Instant> = HashMap::new();
    loop {
        let current: Option<Window> = *window.borrow();
        let deadline = current.map_or(plan.hard_deadline, |w| {
            (w.drain_until + Duration::from_secs(5)).min(plan.hard_deadline)
        });
        let event = match tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
            Ok(e) => e,
            Err(_) => {
                report.errors.add("disconnect:timeout");
                break;
            }
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                sent_at.insert(pkid, Instant::now());
                report.sent += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let now = Instant::now();
                if let Some(at) = sent_at.remove(&ack.pkid) {
                    let us = now.duration_since(at).as_micros();
                    report
                        .ack_latency_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                report.acked += 1;
                if let Some(w) = current {
                    if now <= w.end {
                        report.acked_in_window += 1;
                    }
                    let second = now.saturating_duration_since(w.start).as_secs();
                    let last = plan.acks_by_second.len().saturating_sub(1);
                    if let Some(bin) = plan
                        .acks_by_second
                        .get(usize::try_from(second).unwrap_or(last).min(last))
                    {
                        bin.fetch_add(1, Ordering::Relaxed);
                    }
                }
                progress.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(Event::Incoming(Packet::Disconnect)) => {
                report.errors.add("mqtt:server_disconnect");
                break;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => break,
            Err(e) => {
                report
                    .errors
                    .add(format!("session:{}", connection_error_kind(&e)));
                break;
            }
        }
    }
    // The publisher ends on its own once the window and the drain are over, or at its next
    // publish once it sees that the connection is gone.
    progress.closed.store(true, Ordering::Relaxed);
    drop(eventloop);
    match publisher.await {
        Ok(errors) => report.errors.merge(errors),
        Err(_) => report.errors.add("publisher:panicked"),
    }
    report
}

/// Publishes at the plan's rate through the window, waits for the PUBACKs, then disconnects.
async fn publish(
    plan: Arc<Plan>,
    id: String,
    client: AsyncClient,
    progress: Arc<Progress>,
    mut window: watch::Receiver<Option<Window>>,
) -> Errors {
    let mut errors = Errors::default();
    let w = loop {
        if let Some(w) = *window.borrow() {
            break w;
        }
        if window.changed().await.is_err() {
            return errors;
        }
    };
    if plan.rate > 0.0 {
        let period = Duration::from_secs_f64(1.0 / plan.rate);
        // A random phase spreads the devices over the period instead of all at once.
        let offset = period.mul_f64(rand::random::<f64>());
        let mut ticks = tokio::time::interval_at((w.start + offset).into(), period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let topic = format!("devices/{id}/messages/events/");
        let mut enqueued = 0u64;
        loop {
            let tick = ticks.tick().await;
            if tick.into_std() >= w.end {
                break;
            }
            match client.try_publish(&topic, QoS::AtLeastOnce, false, plan.payload.clone()) {
                Ok(()) => enqueued += 1,
                Err(_) if progress.closed.load(Ordering::Relaxed) => return errors,
                Err(_) => errors.add("publish:queue_full"),
            }
        }
        // Drain: wait until every enqueued PUBLISH is acknowledged (or the drain ends).
        while Instant::now() < w.drain_until
            && !progress.closed.load(Ordering::Relaxed)
            && progress.acked.load(Ordering::Relaxed) < enqueued
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        tokio::time::sleep_until(w.end.into()).await;
    }
    if client.try_disconnect().is_err() && !progress.closed.load(Ordering::Relaxed) {
        errors.add("disconnect:queue_full");
    }
    errors
}

/// Connect latencies of the probe devices through the window: (CleanSession=1, =0).
#[derive(Default)]
struct Probes {
    clean_ms: Vec<f64>,
    persistent_ms: Vec<f64>,
    errors: Errors,
}

/// Connects the probe devices one after another, every `interval`, alternating
/// CleanSession=1 and 0, until the window ends; each connection is closed once it is up.
async fn probe_connects(
    plan: Arc<Plan>,
    probes: Vec<(String, String)>,
    window: Window,
    interval: Duration,
) -> Probes {
    let mut report = Probes::default();
    if probes.is_empty() {
        return report;
    }
    tokio::time::sleep_until(window.start.into()).await;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0.. {
        if ticks.tick().await.into_std() >= window.end {
            break;
        }
        let (id, key) = &probes[n % probes.len()];
        let clean = n % 2 == 0;
        let options = match mqtt_options(&plan, id, key, clean) {
            Ok(o) => o,
            Err(kind) => {
                report.errors.add(kind);
                continue;
            }
        };
        let (client, mut eventloop) = AsyncClient::new(options, 4);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(plan.connect_timeout);
        eventloop.set_network_options(network);
        let started = Instant::now();
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                if clean {
                    report.clean_ms.push(ms);
                } else {
                    report.persistent_ms.push(ms);
                }
            }
            Ok(_) => report.errors.add("probe:unexpected_event"),
            Err(e) => report
                .errors
                .add(format!("probe:{}", connection_error_kind(&e))),
        }
        // Send the DISCONNECT, then let the connection go.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
    }
    report
}

// ----- reporting -------------------------------------------------------------------------

fn print_text(report: &Value) {
    let r = report;
    println!("hub_load");
    println!(
        "  devices: {} requested, {} ready, {} connected (connect phase {} s)",
        r["devices"]["requested"],
        r["devices"]["ready"],
        r["devices"]["connected"],
        r["connect"]["phase_seconds"]
    );
    println!(
        "  connect latency ms: p50 {} p95 {} p99 {} max {}",
        r["connect"]["latency_ms"]["p50"],
        r["connect"]["latency_ms"]["p95"],
        r["connect"]["latency_ms"]["p99"],
        r["connect"]["latency_ms"]["max"]
    );
    println!(
        "  telemetry: rate {}/s/device for {} s, offered {}/s",
        r["telemetry"]["rate_per_device"],
        r["telemetry"]["duration_seconds"],
        r["telemetry"]["offered_per_second"]
    );
    println!(
        "  sent {}, acked {} ({} within the window), acked/s {}",
        r["telemetry"]["sent"],
        r["telemetry"]["acked"],
        r["telemetry"]["acked_in_window"],
        r["telemetry"]["acked_per_second"]
    );
    println!(
        "  publish->ack latency ms: p50 {} p95 {} p99 {} max {}",
        r["telemetry"]["ack_latency_ms"]["p50"],
        r["telemetry"]["ack_latency_ms"]["p95"],
        r["telemetry"]["ack_latency_ms"]["p99"],
        r["telemetry"]["ack_latency_ms"]["max"]
    );
    println!("  acked by second: {}", r["telemetry"]["acked_by_second"]);
    if let Some(probes) = r.get("probe_connects") {
        for kind in ["clean_session", "persistent_session"] {
            let ms = &probes[kind]["latency_ms"];
            println!(
                "  probe connects under load, {kind}: n {} p50 {} p99 {} max {} ms",
                probes[kind]["count"], ms["p50"], ms["p99"], ms["max"]
            );
        }
    }
    if let Some(server) = r.get("server") {
        println!(
            "  server RSS KiB: before {} after {} => {} KiB per connection; CPU s in window {}",
            server["rss_before_kib"],
            server["rss_connected_kib"],
            server["kib_per_connection"],
            server["cpu_seconds_in_window"]
        );
    }
    println!("  errors: {}", r["errors"]);
    println!("  elapsed {} s", r["elapsed_seconds"]);
}

// ----- main -------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_and_report(run(args.clone()), args.json, print_text)
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let began = Instant::now();
    if !args.rate.is_finite() || !(0.0..=1000.0).contains(&args.rate) {
        bail!("--rate must be between 0 and 1000 messages per second per device");
    }
    let mut errors = Errors::default();
    let ids: Vec<String> = (0..args.devices)
        .map(|n| format!("{}-{n:05}", args.prefix))
        .collect();
    let probe_ids: Vec<String> = (0..args.probe_connects)
        .map(|n| format!("{}-probe-{n:03}", args.prefix))
        .collect();
    if !probe_ids.is_empty() && args.broker.is_some() {
        bail!("--probe-connects needs the hub (its devices are created through its API)");
    }
    let setup_started = Instant::now();
    // The hub: devices through its service API, TLS and SAS. A plain broker: nothing to set up.
    let (hub, mqtt_host, mqtt_port, tls, devices, probes) =
        match (&args.broker, &args.hub_connection_string, &args.ca_file) {
            (Some(broker), _, _) => {
                let (host, port) = broker
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((host_without_port(h).to_string(), p.parse().ok()?)))
                    .context("--broker must be HOST:PORT")?;
                require_loopback(&host, TOOL)?;
                let devices: Vec<(String, String)> =
                    ids.iter().map(|id| (id.clone(), String::new())).collect();
                (None, host, port, None, devices, Vec::new())
            }
            (None, Some(cs), Some(ca_file)) => {
                let hub = parse_connection_string(cs)?;
                let mqtt_host = args
                    .mqtt_host
                    .clone()
                    .unwrap_or_else(|| host_without_port(&hub.host).to_string());
                require_loopback(host_without_port(&hub.host), TOOL)?;
                for host in mqtt_host.split(',') {
                    require_loopback(host, TOOL)?;
                }
                let ca_pem = std::fs::read(ca_file)
                    .with_context(|| format!("reading {}", ca_file.display()))?;
                let http = https_client(&ca_pem)?;
                let base = format!("https://{}", hub.host);
                let auth = hub.service_token(TOKEN_TTL_SECS)?;
                let devices = tokio::time::timeout(
                    Duration::from_secs(args.setup_timeout),
                    ensure_devices(
                        &http,
                        &base,
                        &auth,
                        &ids,
                        args.create_concurrency,
                        &mut errors,
                    ),
                )
                .await
                .context("device setup exceeded --setup-timeout")?;
                let probes = ensure_devices(
                    &http,
                    &base,
                    &auth,
                    &probe_ids,
                    args.create_concurrency,
                    &mut errors,
                )
                .await;
                // One native-tls connector for every connection (building one per connection
                // reloads the trust store; building-blocks §7).
                let tls = connector(&ca_pem, None, false)?;
                (
                    Some((hub.host.clone(), http, base, auth)),
                    mqtt_host,
                    args.mqtt_port,
                    Some(tls),
                    devices,
                    probes,
                )
            }
            _ => bail!("give --hub-connection-string and --ca-file, or --broker"),
        };
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    // The hard deadline covers the whole MQTT phase.
    let mqtt_started = Instant::now();
    let hard_deadline = mqtt_started + Duration::from_secs(args.duration + args.deadline_slack);

    let plan = Arc::new(Plan {
        hub_host: hub.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
        mqtt_hosts: mqtt_host.split(',').map(str::to_owned).collect(),
        mqtt_port,
        connector: tls,
        rate: args.rate,
        payload: (0..args.payload_bytes)
            .map(|i| b'a' + (i % 26) as u8)
            .collect(),
        connect_timeout: 30,
        hard_deadline,
        acks_by_second: (0..args.duration + args.drain + 1)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });

    let server_rss_before = args.server_pid.map(rss_kib).transpose()?;

    // Connect everyone.
    let handshakes = Arc::new(Semaphore::new(args.handshakes.max(1)));
    let (connected_tx, mut connected_rx) = mpsc::channel(devices.len().max(1));
    let (window_tx, window_rx) = watch::channel(None::<Window>);
    let mut tasks = JoinSet::new();
    for (id, key) in &devices {
        tasks.spawn(run_device(
            plan.clone(),
            id.clone(),
            key.clone(),
            handshakes.clone(),
            connected_tx.clone(),
            window_rx.clone(),
        ));
    }
    drop(connected_tx);
    let mut connected = 0usize;
    let mut attempted = 0usize;
    while attempted < devices.len() {
        match tokio::time::timeout_at(hard_deadline.into(), connected_rx.recv()).await {
            Ok(Some(ok)) => {
                attempted += 1;
                connected += usize::from(ok);
            }
            Ok(None) => break,
            Err(_) => {
                errors.add("deadline:connect_phase");
                break;
            }
        }
    }
    let connect_phase_seconds = mqtt_started.elapsed().as_secs_f64();

    // Let the server settle before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_rss_connected = args.server_pid.map(rss_kib).transpose()?;
    let server_cpu_before = args.server_pid.and_then(cpu_seconds);

    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(args.duration);
    let window = Window {
        start,
        end,
        drain_until: end + Duration::from_secs(args.drain),
    };
    let _ = window_tx.send(Some(window));
    let prober = tokio::spawn(probe_connects(
        plan.clone(),
        probes,
        window,
        Duration::from_millis(args.probe_interval_ms.max(1)),
    ));

    // Collect until the hard deadline; what is not back by then is abandoned.
    let mut connect_ms = Vec::new();
    let mut latencies_ms = Vec::new();
    let (mut sent, mut acked, mut acked_in_window) = (0u64, 0u64, 0u64);
    let mut server_cpu_after = None;
    loop {
        match tokio::time::timeout_at(hard_deadline.into(), tasks.join_next()).await {
            Ok(Some(Ok(report))) => {
                connect_ms.extend(report.connect_ms);
                latencies_ms.extend(report.ack_latency_us.iter().map(|&us| us as f64 / 1000.0));
                sent += report.sent;
                acked += report.acked;
                acked_in_window += report.acked_in_window;
                errors.merge(report.errors);
            }
            Ok(Some(Err(_))) => errors.add("device:task_panicked"),
            Ok(None) => break,
            Err(_) => {
                errors.add("deadline:abandoned_devices");
                tasks.abort_all();
                break;
            }
        }
        if server_cpu_after.is_none() && Instant::now() >= end {
            server_cpu_after = args.server_pid.and_then(cpu_seconds);
        }
    }
    if server_cpu_after.is_none() {
        server_cpu_after = args.server_pid.and_then(cpu_seconds);
    }
    let probes = match tokio::time::timeout_at(hard_deadline.into(), prober).await {
        Ok(Ok(probes)) => probes,
        Ok(Err(_)) => {
            errors.add("probe:task_panicked");
            Probes::default()
        }
        Err(_) => {
            errors.add("deadline:probes");
            Probes::default()
        }
    };
    errors.merge(probes.errors);

    if let Some((_, http, base, auth)) = hub.as_ref().filter(|_| args.delete_devices) {
        let mut set = JoinSet::new();
        let gate = Arc::new(Semaphore::new(args.create_concurrency.max(1)));
        for (id, _) in &devices {
            let (http, base, auth, id, gate) = (
                http.clone(),
                base.clone(),
                auth.clone(),
                id.clone(),
                gate.clone(),
            );
            set.spawn(async move {
                let _permit = gate.acquire_owned().await;
                delete_device(&http, &base, &auth, &id).await
            });
        }
        let deleting = async {
            let mut failed = 0u64;
            while let Some(done) = set.join_next().await {
                failed += u64::from(!matches!(done, Ok(true)));
            }
            failed
        };
        match tokio::time::timeout(Duration::from_secs(args.setup_timeout), deleting).await {
            Ok(0) => {}
            Ok(failed) => {
                for _ in 0..failed {
                    errors.add("delete:failed");
                }
            }
            Err(_) => errors.add("delete:timeout"),
        }
    }

    let duration = args.duration as f64;
    let mut by_second: Vec<u64> = plan
        .acks_by_second
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    while by_second.len() > args.duration as usize && by_second.last() == Some(&0) {
        by_second.pop();
    }
    let mut report = json!({
        "target": if args.broker.is_some() { "broker" } else { "hub" },
        "devices": {"requested": args.devices, "ready": devices.len(), "connected": connected},
        "setup_seconds": round2(setup_seconds),
        "connect": {
            "phase_seconds": round2(connect_phase_seconds),
            "handshakes_in_flight": args.handshakes,
            "latency_ms": percentiles(connect_ms),
        },
        "telemetry": {
            "rate_per_device": args.rate,
            "duration_seconds": args.duration,
            "payload_bytes": args.payload_bytes,
            "offered_per_second": args.rate * connected as f64,
            "sent": sent,
            "acked": acked,
            "acked_in_window": acked_in_window,
            "acked_per_second": if duration > 0.0 {
                (acked_in_window as f64 / duration * 10.0).round() / 10.0
            } else {
                0.0
            },
            "ack_latency_ms": percentiles(latencies_ms),
            "acked_by_second": by_second,
        },
        "errors": errors.0,
        "elapsed_seconds": round2(began.elapsed().as_secs_f64()),
    });
    if args.probe_connects > 0 {
        report["probe_connects"] = json!({
            "devices": args.probe_connects,
            "interval_ms": args.probe_interval_ms,
            "clean_session": {
                "count": probes.clean_ms.len(),
                "latency_ms": percentiles(probes.clean_ms),
            },
            "persistent_session": {
                "count": probes.persistent_ms.len(),
                "latency_ms": percentiles(probes.persistent_ms),
            },
        });
    }
    if let (Some(pid), Some(before), Some(after)) =
        (args.server_pid, server_rss_before, server_rss_connected)
    {
        let per = if connected > 0 {
            ((after as f64 - before as f64) / connected as f64 * 10.0).round() / 10.0
        } else {
            0.0
        };
        let cpu = match (server_cpu_before, server_cpu_after) {
            (Some(b), Some(a)) => Some(round2(a - b)),
            _ => None,
        };
        report["server"] = json!({
            "pid": pid,
            "rss_before_kib": before,
            "rss_connected_kib": after,
            "kib_per_connection": per,
            "cpu_seconds_in_window": cpu,
        });
    }
    Ok(report)
}
