//! The simulator's hub side: one provisioned device connects to its assigned hub over MQTT
//! (hub-protocol §1), subscribes to twin responses, then sends QoS 1 telemetry and reported
//! twin patches at the asked rates through the shared window, and counts the answers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::tokio_native_tls::native_tls;
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};
use zerotouch_attestation::symmetric_key;

use super::mqtt::{connection_error_kind, response_status, topic_query_value};
use super::provision::{Assignment, Credential, TOKEN_TTL_SECS};
use super::stats::Errors;

const MQTT_HUB_API_VERSION: &str = "2019-10-01";

/// Live counters for the progress line.
#[derive(Default)]
pub struct Counters {
    pub provisioned: AtomicU64,
    pub provision_failed: AtomicU64,
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    pub telemetry_acked: AtomicU64,
    pub twin_acked: AtomicU64,
    pub errors: AtomicU64,
}

/// When telemetry runs; sent to every device once all have connected.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
    /// Answers still outstanding after this are given up.
    pub drain_until: Instant,
}

/// Settings every device shares.
pub struct HubPlan {
    pub mqtt_port: u16,
    /// Dial (and check the certificate for) this host instead of the assigned hub's name.
    pub hub_host: Option<String>,
    pub ca_pem: Vec<u8>,
    /// For SAS devices: one connector for all.
    pub shared_connector: native_tls::TlsConnector,
    /// Messages per second per device.
    pub rate: f64,
    /// Reported patches per second per device.
    pub twin_rate: f64,
    pub payload_bytes: usize,
    pub connect_timeout: Duration,
    /// Only loopback hubs may be dialled (unless the operator named a host).
    pub loopback_only: bool,
    pub counters: Arc<Counters>,
    /// Nothing of the hub phase outlives this.
    pub hard_deadline: Instant,
}

#[derive(Default)]
pub struct HubReport {
    pub connect_ms: Option<f64>,
    pub sent: u64,
    pub acked: u64,
    pub acked_in_window: u64,
    pub ack_latency_us: Vec<u32>,
    pub twin_sent: u64,
    pub twin_acked: u64,
    pub twin_acked_in_window: u64,
    pub twin_latency_us: Vec<u32>,
    pub errors: Errors,
}

#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    twin_answered: AtomicU64,
    closed: AtomicBool,
    /// Twin requests in flight: rid → when it was handed to the client.
    twin_sent_at: Mutex<HashMap<u64, Instant>>,
    /// Whether each PUBLISH handed to the client, in order, is a twin request (`true`) or
    /// telemetry: the client writes them in that order, so `Outgoing::Publish` events match.
    kinds: Mutex<VecDeque<bool>>,
}

fn micros(since: Instant, now: Instant) -> u32 {
    u32::try_from(now.duration_since(since).as_micros()).unwrap_or(u32::MAX)
}

/// Refuses a hub whose name resolves to anything but loopback addresses.
async fn check_loopback(host: &str, port: u16) -> Result<(), String> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| "hub:unresolvable".to_string())?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err("hub:not_loopback".into());
    }
    Ok(())
}

fn mqtt_options(plan: &HubPlan, assignment: &Assignment) -> Result<MqttOptions, String> {
    let id = &assignment.device_id;
    let hub = &assignment.assigned_hub;
    let dial = plan.hub_host.clone().unwrap_or_else(|| hub.clone());
    let mut options = MqttOptions::new(id, dial, plan.mqtt_port);
    let username = format!("{hub}/{id}/?api-version={MQTT_HUB_API_VERSION}");
    let connector = match &assignment.hub_credential {
        Credential::Sas(key) => {
            let token = symmetric_key::sign(
                &format!("{hub}/devices/{id}"),
                key,
                zerotouch_service::time::now_unix() + TOKEN_TTL_SECS,
                None,
            )
            .map_err(|_| "sign:bad_key".to_string())?;
            options.set_credentials(username, token);
            plan.shared_connector.clone()
        }
        Credential::Certificate { chain_pem, key_pem } => {
            options.set_credentials(username, "");
            super::mqtt::connector(&plan.ca_pem, Some((chain_pem, key_pem)), true)
                .map_err(|_| "identity:invalid".to_string())?
        }
    };
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(false)
        .set_transport(Transport::tls_with_config(
            TlsConfiguration::NativeConnector(connector),
        ));
    Ok(options)
}

/// One device at its hub: connect (holding a permit of `gate`), report the outcome on
/// `connected`, then run through the window, drain, and disconnect.
pub async fn run_device(
    plan: Arc<HubPlan>,
    assignment: Assignment,
    gate: Arc<Semaphore>,
    connected: mpsc::Sender<bool>,
    window: watch::Receiver<Option<Window>>,
) -> HubReport {
    let mut report = HubReport::default();
    let fail = |report: &mut HubReport, kind: String| {
        report.errors.add(kind);
        plan.counters.connect_failed.fetch_add(1, Ordering::Relaxed);
        plan.counters.errors.fetch_add(1, Ordering::Relaxed);
    };
    if plan.loopback_only {
        let host = plan.hub_host.as_deref().unwrap_or(&assignment.assigned_hub);
        if let Err(kind) = check_loopback(host, plan.mqtt_port).await {
            fail(&mut report, kind);
            let _ = connected.send(false).await;
            return report;
        }
    }
    let options = match mqtt_options(&plan, &assignment) {
        Ok(o) => o,
        Err(kind) => {
            fail(&mut report, kind);
            let _ = connected.send(false).await;
            return report;
        }
    };
    let queue = ((plan.rate + plan.twin_rate) * 2.0).clamp(16.0, 1024.0) as usize;
    let (client, mut eventloop) = AsyncClient::new(options, queue);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(plan.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);

    let ok = match super::mqtt::connect(&mut eventloop, &gate, "hub_connect").await {
        Ok(ms) => {
            report.connect_ms = Some(ms);
            true
        }
        Err(kind) => {
            fail(&mut report, kind);
            false
        }
    };
    if ok {
        plan.counters.connected.fetch_add(1, Ordering::Relaxed);
    }
    let _ = connected.send(ok).await;
    if !ok {
        return report;
    }
    if plan.twin_rate > 0.0
        && client
            .try_subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
            .is_err()
    {
        report.errors.add("twin:subscribe_queue_full");
    }

    let progress = Arc::new(Progress::default());
    let publisher = tokio::spawn(publish(
        plan.clone(),
        assignment.device_id.clone(),
        client.clone(),
        progress.clone(),
        window.clone(),
    ));

    // The only place that polls the connection; ended by its deadline at the latest.
    let mut sent_at: HashMap<u16, (Instant, bool)> = HashMap::new();
    let mut session_errors = Errors::default();
    loop {
        let current: Option<Window> = *window.borrow();
        let deadline = current.map_or(plan.hard_deadline, |w| {
            (w.drain_until + Duration::from_secs(5)).min(plan.hard_deadline)
        });
        let event = match tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
            Ok(e) => e,
            Err(_) => {
                session_errors.add("hub:deadline");
                break;
            }
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let is_twin = progress
                    .kinds
                    .lock()
                    .ok()
                    .and_then(|mut k| k.pop_front())
                    .unwrap_or(false);
                sent_at.insert(pkid, (Instant::now(), is_twin));
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                // Twin requests are QoS 1 too: their answer is the response topic, below.
                let now = Instant::now();
                if let Some((at, false)) = sent_at.remove(&ack.pkid) {
                    report.ack_latency_us.push(micros(at, now));
                    report.acked += 1;
                    if current.is_some_and(|w| now <= w.end) {
                        report.acked_in_window += 1;
                    }
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                    plan.counters
                        .telemetry_acked
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let topic = publish.topic.as_str();
                let Some(status) = response_status(topic, "$iothub/twin/res/") else {
                    continue;
                };
                let now = Instant::now();
                let rid = topic_query_value(topic, "$rid").and_then(|r| r.parse::<u64>().ok());
                let started = rid.and_then(|rid| {
                    progress
                        .twin_sent_at
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&rid))
                });
                let Some(at) = started else { continue };
                progress.twin_answered.fetch_add(1, Ordering::Relaxed);
                if (200..300).contains(&status) {
                    report.twin_acked += 1;
                    report.twin_latency_us.push(micros(at, now));
                    if current.is_some_and(|w| now <= w.end) {
                        report.twin_acked_in_window += 1;
                    }
                    plan.counters.twin_acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    session_errors.add(format!("twin:status_{status}"));
                    plan.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(Event::Incoming(Packet::Disconnect)) => {
                session_errors.add("hub:server_disconnect");
                break;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => break,
            Err(e) => {
                session_errors.add(format!("hub_session:{}", connection_error_kind(&e)));
                plan.counters.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    progress.closed.store(true, Ordering::Relaxed);
    drop(eventloop);
    report.errors.merge(session_errors);
    match publisher.await {
        Ok(outcome) => {
            report.sent = outcome.sent;
            report.twin_sent = outcome.twin_sent;
            report.errors.merge(outcome.errors);
        }
        Err(_) => report.errors.add("publisher:panicked"),
    }
    report
}

struct PublishOutcome {
    sent: u64,
    twin_sent: u64,
    errors: Errors,
}

/// The next tick of an optional interval; never, without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) -> Instant {
    match interval {
        Some(i) => i.tick().await.into_std(),
        None => std::future::pending().await,
    }
}

fn interval(window: &Window, rate: f64) -> Option<tokio::time::Interval> {
    (rate > 0.0).then(|| {
        let period = Duration::from_secs_f64(1.0 / rate);
        // A random phase spreads devices over the period instead of all at once.
        let offset = period.mul_f64(rand::random::<f64>());
        let mut i = tokio::time::interval_at((window.start + offset).into(), period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    })
}

/// Publishes telemetry and reported patches through the window, waits for the answers, then
/// disconnects.
async fn publish(
    plan: Arc<HubPlan>,
    id: String,
    client: AsyncClient,
    progress: Arc<Progress>,
    mut window: watch::Receiver<Option<Window>>,
) -> PublishOutcome {
    let mut outcome = PublishOutcome {
        sent: 0,
        twin_sent: 0,
        errors: Errors::default(),
    };
    let w = loop {
        if let Some(w) = *window.borrow() {
            break w;
        }
        if window.changed().await.is_err() {
            return outcome;
        }
    };
    let topic = format!("devices/{id}/messages/events/");
    let filler = "x".repeat(plan.payload_bytes.saturating_sub(64));
    let mut telemetry = interval(&w, plan.rate);
    let mut twin = interval(&w, plan.twin_rate);
    let mut seq = 0u64;
    loop {
        let (at, is_twin) = tokio::select! {
            at = tick(&mut telemetry) => (at, false),
            at = tick(&mut twin) => (at, true),
            _ = tokio::time::sleep_until(w.end.into()) => break,
        };
        if at >= w.end {
            break;
        }
        seq += 1;
        if let Ok(mut kinds) = progress.kinds.lock() {
            kinds.push_back(is_twin);
        }
        let result = if is_twin {
            let rid = seq;
            if let Ok(mut m) = progress.twin_sent_at.lock() {
                m.insert(rid, Instant::now());
            }
            let patch =
                json!({"simulator": {"seq": seq, "at": zerotouch_service::time::now_unix()}});
            client.try_publish(
                format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                QoS::AtLeastOnce,
                false,
                patch.to_string().into_bytes(),
            )
        } else {
            let body = json!({"deviceId": id, "seq": seq, "temperature": 20.0 + (seq % 10) as f64, "fill": filler});
            client.try_publish(
                &topic,
                QoS::AtLeastOnce,
                false,
                body.to_string().into_bytes(),
            )
        };
        if result.is_err()
            && let Ok(mut kinds) = progress.kinds.lock()
        {
            kinds.pop_back();
        }
        match result {
            Ok(()) if is_twin => outcome.twin_sent += 1,
            Ok(()) => outcome.sent += 1,
            Err(_) if progress.closed.load(Ordering::Relaxed) => return outcome,
            Err(_) => outcome.errors.add("publish:queue_full"),
        }
    }
    // Drain: wait for every PUBACK and every twin answer (or the end of the drain).
    while Instant::now() < w.drain_until
        && !progress.closed.load(Ordering::Relaxed)
        && (progress.acked.load(Ordering::Relaxed) < outcome.sent
            || progress.twin_answered.load(Ordering::Relaxed) < outcome.twin_sent)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if client.try_disconnect().is_err() && !progress.closed.load(Ordering::Relaxed) {
        outcome.errors.add("disconnect:queue_full");
    }
    outcome
}
