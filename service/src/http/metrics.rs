//! Prometheus metrics at `GET /metrics` (text exposition format, no authentication: it carries
//! no secrets and scrapers rarely speak SAS).

use std::time::Duration;

use actix_web::{HttpResponse, web};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::routes;
use crate::hub::Hub;

/// Request counters and latency histograms, by route pattern (never by raw path, which would
/// put device ids into label values).
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("zerotouch".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["method", "route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
        })
    }

    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.latency
            .with_label_values(&[method, route])
            .observe(elapsed.as_secs_f64());
    }

    pub fn render(
        &self,
        hub: Option<&Hub>,
        dps: Option<&crate::dps::Dps>,
        cluster: Option<&crate::cluster::Cluster>,
    ) -> Result<String, ApiError> {
        let mut buffer = Vec::new();
        let mut families = self.registry.gather();
        if let Some(dps) = dps {
            families.extend(dps.metrics.registry.gather());
        }
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .map_err(ApiError::internal)?;
        let mut text = String::from_utf8(buffer).map_err(ApiError::internal)?;
        render_process(&mut text);
        if let Some(hub) = hub {
            render_hub(hub, &mut text);
        }
        if let Some(cluster) = cluster {
            render_cluster(cluster, &mut text);
        }
        Ok(text)
    }
}

/// The soft limit on open files in force, if it can be read (`serve` raises it at start:
/// `server::raise_open_file_limit`).
pub fn open_file_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Figures of the process: the open file limit `serve` raised at start (each connection is a
/// file descriptor).
fn render_process(out: &mut String) {
    use std::fmt::Write as _;
    if let Some(limit) = open_file_limit() {
        let _ = writeln!(
            out,
            "# HELP zerotouch_process_max_fds Soft limit on open file descriptors (RLIMIT_NOFILE)"
        );
        let _ = writeln!(out, "# TYPE zerotouch_process_max_fds gauge");
        let _ = writeln!(out, "zerotouch_process_max_fds {limit}");
    }
    let _ = writeln!(
        out,
        "# HELP zerotouch_log_lines_dropped_total Log lines lost because the log could not be \
         written or kept up\n# TYPE zerotouch_log_lines_dropped_total counter\n\
         zerotouch_log_lines_dropped_total {}",
        crate::logging::dropped_lines()
    );
}

/// Replica mode: NATS and the replicas heard from.
fn render_cluster(cluster: &crate::cluster::Cluster, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP zerotouch_cluster_nats_connected 1 while this replica's NATS connection is up\n\
         # TYPE zerotouch_cluster_nats_connected gauge\n\
         zerotouch_cluster_nats_connected {}",
        u8::from(cluster.connected())
    );
    let _ = writeln!(
        out,
        "# HELP zerotouch_cluster_replicas Replicas heard from in the last three heartbeats, \
         this one included\n# TYPE zerotouch_cluster_replicas gauge\n\
         zerotouch_cluster_replicas {}",
        cluster.members().len()
    );
}

/// The hub's figures, read at scrape time from its counters.
fn render_hub(hub: &Hub, out: &mut String) {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let m = &hub.metrics;
    let telemetry = hub.telemetry.stats();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP zerotouch_hub_{name} {help}");
        let _ = writeln!(out, "# TYPE zerotouch_hub_{name} {kind}");
        let _ = writeln!(out, "zerotouch_hub_{name} {value}");
    };
    metric(
        "connected_devices",
        "gauge",
        "Devices connected over MQTT",
        hub.connected_count() as u64,
    );
    metric(
        "messages_in_total",
        "counter",
        "Telemetry messages accepted",
        m.messages_in.load(Relaxed),
    );
    metric(
        "bytes_in_total",
        "counter",
        "Telemetry body bytes accepted",
        m.bytes_in.load(Relaxed),
    );
    metric(
        "twin_operations_total",
        "counter",
        "Twin reads and writes",
        m.twin_operations.load(Relaxed),
    );
    metric(
        "twin_throttled_total",
        "counter",
        "Device twin requests answered 429 because the hub was saturated",
        m.twin_throttled.load(Relaxed),
    );
    metric(
        "method_calls_total",
        "counter",
        "Direct method invocations",
        m.method_calls.load(Relaxed),
    );
    metric(
        "telemetry_batches_total",
        "counter",
        "Telemetry group commits",
        telemetry.batches,
    );
    let _ = writeln!(
        out,
        "# HELP zerotouch_hub_auth_failures_total Refused device and service credentials by reason"
    );
    let _ = writeln!(out, "# TYPE zerotouch_hub_auth_failures_total counter");
    let failures = m
        .auth_failures
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    let mut reasons: Vec<_> = failures.into_iter().collect();
    reasons.sort();
    for (reason, count) in reasons {
        let _ = writeln!(
            out,
            "zerotouch_hub_auth_failures_total{{reason=\"{reason}\"}} {count}"
        );
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    // A resource, not `cfg.route`: another method is then a 405, not the default service's 404.
    cfg.service(web::resource(routes::METRICS).route(web::get().to(metrics)));
}

#[utoipa::path(
    get,
    path = routes::METRICS,
    operation_id = "metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String), (status = 500, description = "Internal error", body = crate::http::openapi::AzureError)),
)]
async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(
            state.hub.as_deref(),
            state.dps.as_deref(),
            state.cluster.as_deref(),
        )?))
}
