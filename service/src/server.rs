//! Starting and stopping the service: storage, bootstrap, the HTTPS and MQTT listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, middleware, web};
use anyhow::Context;

use crate::bootstrap::{self, Instance};
use crate::config::Settings;
use crate::db;
use crate::http::{self, AppState};
use crate::{mqtt, tls};

/// Addresses a started service listens on (ports resolved when 0 was configured).
#[derive(Debug, Clone)]
pub struct Bound {
    pub https: SocketAddr,
    pub mqtt: SocketAddr,
    pub instance: Arc<Instance>,
    /// The MQTT listener (connection count for metrics, shutdown).
    pub mqtt_listener: mqtt::listener::MqttListener,
    /// The AMQP listener, when this process runs a hub and could bind it.
    pub amqp: Option<crate::amqp::AmqpListener>,
    /// The hub, when this process runs one.
    pub hub: Option<Arc<crate::hub::Hub>>,
    /// This process's lock on the data dir (one server per data dir), held while this lives.
    pub data_dir_lock: Arc<crate::lock::DataDirLock>,
    /// The hub lock of a PostgreSQL database (one hub per database), when this process runs
    /// the hub there; held while this lives.
    pub hub_lock: Option<Arc<db::HubLock>>,
}

/// Opens storage, bootstraps, binds both listeners. Returns the bound addresses and the future
/// that runs the HTTPS server until it is stopped. Must run inside an actix system.
pub async fn start(settings: Settings) -> anyhow::Result<(Bound, actix_web::dev::Server)> {
    // Before anything is created: a port this user may not bind fails here, with the fix.
    check_bind_permission("listen.https", settings.listen.https)?;
    check_bind_permission("listen.mqtt", settings.listen.mqtt)?;
    bootstrap::prepare_data_dir(&settings)?;
    let data_dir_lock = Arc::new(crate::lock::DataDirLock::acquire(
        &settings.service.data_dir,
    )?);
    // Replicas share the database on purpose (`cluster`); a lone hub locks it.
    let hub_lock = if settings.service.role.runs_hub() && !settings.cluster.enabled() {
        let url = settings.database_url()?;
        let timeout = db::Options::default().connection_timeout;
        web::block(move || db::HubLock::acquire(&url, timeout))
            .await
            .context("taking the hub lock")??
            .map(Arc::new)
    } else {
        None
    };
    let url = settings.database_url()?;
    let store = web::block(move || db::open(&url))
        .await
        .context("opening the database")?
        .context("opening the database")?;
    let store: Arc<dyn db::DocumentStore> = Arc::new(store);
    let instance = {
        let settings = settings.clone();
        let store = store.clone();
        web::block(move || bootstrap::bootstrap(&settings, store.as_ref()))
            .await
            .context("bootstrapping")??
    };
    let instance = Arc::new(instance);
    let paths = &instance.paths;
    // A hub of its own joins its provisioning service (first start) and then presents the
    // certificate that service's CA issued it.
    let joined = crate::hub::join::ensure_joined(&settings, store.clone()).await?;
    let (server_chain, server_key) = match &joined {
        Some(j) => (&j.paths.server_chain, &j.paths.server_key),
        None => (&paths.server_chain, &paths.server_key),
    };

    let https_tls = tls::https_config(server_chain, server_key)?;
    let mqtt_tls = tls::mqtt_acceptor(server_chain, server_key)?;
    let amqp_tls = tls::acceptor(server_chain, server_key)?;

    let cluster = if settings.cluster.enabled() {
        let cluster = crate::cluster::Cluster::connect(&settings.cluster).await?;
        tracing::info!(
            replica = cluster.replica(),
            "replica mode: joined the other replicas through NATS"
        );
        Some(Arc::new(cluster))
    } else {
        None
    };
    let hub = if settings.service.role.runs_hub() {
        let url = settings.database_url()?;
        let retention = crate::telemetry::Retention {
            max_age: std::time::Duration::from_secs(
                settings.telemetry.retention_hours.saturating_mul(3600),
            ),
            max_bytes: settings.telemetry.max_bytes,
            ..crate::telemetry::Retention::default()
        };
        let telemetry = match &cluster {
            // Replicas share one log, the JetStream stream.
            Some(cluster) => crate::telemetry::Telemetry::start_stream(
                cluster,
                retention,
                settings.cluster.stream_replicas,
            )
            .await
            .context("opening the telemetry stream")?,
            None => web::block(move || crate::telemetry::Telemetry::start(&url, retention))
                .await
                .context("opening the telemetry store")?
                .context("opening the telemetry store")?,
        };
        let trust_bundle = match &joined {
            Some(j) => j.trust_bundle()?,
            None => instance.ca.trust_bundle_pem(),
        };
        Some(Arc::new(crate::hub::Hub::new(
            store.clone(),
            settings.service.hostnames.clone(),
            settings.hub_hostname(),
            telemetry,
            trust_bundle,
        )))
    } else {
        None
    };
    let pki = Arc::new(
        crate::pki::Pki::new(
            store.clone(),
            instance.clone(),
            settings
                .service
                .hostnames
                .first()
                .map(String::as_str)
                .unwrap_or("localhost"),
        )
        .context("starting the PKI")?,
    );
    if let Some(hub) = &hub {
        if let Some(cluster) = &cluster {
            hub.join_replicas(cluster.clone(), settings.cluster.stream_replicas)
                .await?;
        }
        let hub = hub.clone();
        pki.subscribe(Arc::new(move |serial| hub.certificate_revoked(serial)));
    }
    let dps = if settings.service.role.runs_dps() {
        Some(Arc::new(
            crate::dps::Dps::new(
                store.clone(),
                instance.id_scope.clone(),
                hub.clone(),
                instance.clone(),
                &settings,
                manufacturer_roots(&settings)?,
                pki.clone(),
            )
            .context("starting the provisioning service")?,
        ))
    } else {
        None
    };
    if let (Some(dps), Some(cluster)) = (&dps, &cluster) {
        dps.join_replicas(cluster.clone(), settings.cluster.stream_replicas)
            .await
            .context("sharing registration state through NATS JetStream")?;
    }
    if let Some(dps) = &dps {
        actix_web::rt::spawn(dps.clone().sweep_stale_identities_every(
            std::time::Duration::from_secs(settings.dps.hub_heartbeat_seconds),
        ));
    }
    let mqtt_app: Arc<dyn mqtt::Application> = Arc::new(crate::dps::mqtt::Router {
        dps: dps.clone().map(crate::dps::mqtt::DpsApplication::new),
        hub: hub
            .as_ref()
            .map(|hub| crate::hub::mqtt::HubApplication::new(hub.clone())),
    });

    let state = web::Data::new(AppState {
        hub: hub.clone(),
        dps,
        cluster: cluster.clone(),
        store: store.clone(),
        settings: settings.clone(),
        instance: instance.clone(),
        metrics: http::metrics::Metrics::new().context("creating metrics")?,
        console: http::console::Console::default(),
    });
    actix_web::rt::spawn(http::console::sample_rates(state.clone()));
    let pki_data = web::Data::from(pki.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(pki_data.clone())
            .wrap(middleware::from_fn(http::observe))
            .configure(http::configure)
    })
    .on_connect(tls::on_connect)
    // Without it a new connection's first answer can wait ~40 ms for the client's delayed ACK
    // (TLS 1.3 writes its session tickets separately): measured on device registrations.
    .tcp_nodelay(true)
    .bind_rustls_0_23(settings.listen.https, https_tls)
    .with_context(|| format!("binding HTTPS to {}", settings.listen.https))?;
    let https = server
        .addrs()
        .first()
        .copied()
        .context("the HTTPS listener has no address")?;
    pki.set_public_port(settings.service.public_https_port.unwrap_or(https.port()));
    let server = server.shutdown_timeout(5).run();

    let mqtt_listener = mqtt::listener::start(
        settings.listen.mqtt,
        mqtt_tls,
        mqtt_app,
        store,
        mqtt::listener::MqttLimits {
            workers: settings.mqtt.worker_threads(),
            ..mqtt::listener::MqttLimits::default()
        },
    )
    .await
    .with_context(|| format!("binding MQTT to {}", settings.listen.mqtt))?;
    let mqtt = mqtt_listener.local_addr();
    let amqp = match &hub {
        Some(hub) => start_amqp(&settings, amqp_tls, hub.clone()).await?,
        None => None,
    };
    if let (Some(joined), Some(hub)) = (joined, hub.clone()) {
        actix_web::rt::spawn(crate::hub::join::heartbeats(joined, hub));
    }
    tracing::info!(
        %https,
        %mqtt,
        amqp = ?amqp.as_ref().map(crate::amqp::AmqpListener::local_addr),
        mqtt_workers = mqtt_listener.workers(),
        id_scope = %instance.id_scope,
        "zerotouch is ready"
    );
    Ok((
        Bound {
            https,
            mqtt,
            instance,
            mqtt_listener,
            amqp,
            hub,
            data_dir_lock,
            hub_lock,
        },
        server,
    ))
}

/// The AMQP listener. A configured address must bind; the default one (`0.0.0.0:5671`) is
/// given up with a warning when something else holds it, so that a second server on one
/// machine still starts.
async fn start_amqp(
    settings: &Settings,
    tls: openssl::ssl::SslAcceptor,
    hub: Arc<crate::hub::Hub>,
) -> anyhow::Result<Option<crate::amqp::AmqpListener>> {
    let (addr, configured) = settings.listen.amqp();
    match crate::amqp::start(addr, tls, hub).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if !configured => {
            tracing::warn!(
                %addr,
                error = %e,
                "AMQP is off: the default address is not available; set listen.amqp to serve it"
            );
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("binding AMQP to {addr}")),
    }
}

/// Fails with the cause and the fix when this process may not bind `addr` (a port below 1024
/// without root or `CAP_NET_BIND_SERVICE`). Other bind failures (the address is in use, not
/// local) are left to the real bind, which names the address too.
fn check_bind_permission(key: &str, addr: SocketAddr) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "{key} = {addr}: this user may not bind port {} ({e}). Ports below 1024 need root \
             or the CAP_NET_BIND_SERVICE capability (e.g. `setcap cap_net_bind_service=+ep` on \
             the zerotouch binary, or AmbientCapabilities=CAP_NET_BIND_SERVICE in a systemd \
             unit); or listen on an unprivileged port such as {} and forward to it",
            addr.port(),
            if key == "listen.mqtt" { 8883 } else { 8443 }
        ),
        _ => Ok(()),
    }
}

/// DER of the TPM manufacturer roots named by `dps.tpm_manufacturer_roots`, if any.
fn manufacturer_roots(settings: &Settings) -> anyhow::Result<Vec<Vec<u8>>> {
    let Some(path) = &settings.dps.tpm_manufacturer_roots else {
        return Ok(Vec::new());
    };
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let roots: Vec<Vec<u8>> = openssl::x509::X509::stack_from_pem(&pem)
        .with_context(|| format!("{} is not a PEM certificate bundle", path.display()))?
        .iter()
        .map(|c| c.to_der())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", path.display());
    Ok(roots)
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit: every device
/// connection is a file descriptor, and the common soft default of 1,024 would cap a server
/// near 1,000 devices. Returns the limit in force afterwards (also at `/metrics` as
/// `zerotouch_process_max_fds`).
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// `zerotouch serve`: runs until SIGINT/SIGTERM.
pub fn serve(settings: Settings) -> anyhow::Result<()> {
    match raise_open_file_limit() {
        Ok(limit) => tracing::info!(limit, "open file limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(
            limit = http::metrics::open_file_limit(),
            "could not raise the open file limit (RLIMIT_NOFILE): {e}"
        ),
    }
    let bound = actix_web::rt::System::new().block_on(async move {
        let (bound, server) = start(settings).await?;
        server.await.context("the HTTPS server failed")?;
        // SIGINT/SIGTERM stopped HTTPS; close MQTT sessions (devices reconnect elsewhere or
        // later) and wait until their tasks are gone.
        if let Some(amqp) = &bound.amqp {
            amqp.shutdown();
        }
        bound.mqtt_listener.shutdown();
        bound.mqtt_listener.stopped().await;
        anyhow::Ok(bound)
    })?;
    if let Some(hub) = &bound.hub {
        // Everything acknowledged is already committed; this flushes what is still queued.
        hub.telemetry.shutdown();
    }
    tracing::info!("zerotouch stopped");
    Ok(())
}

/// A service running on its own thread, for tests and embedding.
pub struct Running {
    pub bound: Bound,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// Starts on a background thread and returns once both listeners are bound.
    pub fn spawn(settings: Settings) -> anyhow::Result<Running> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                match start(settings).await {
                    Ok((bound, server)) => {
                        let _ = tx.send(Ok((bound, server.handle())));
                        if let Err(e) = server.await {
                            tracing::error!("server stopped: {e}");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        });
        let (bound, handle) = rx
            .recv()
            .context("the server thread died while starting")??;
        Ok(Running {
            bound,
            handle,
            thread: Some(thread),
        })
    }

    /// Stops gracefully and waits for the thread; listeners are closed on return.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let handle = self.handle.clone();
            // The stop future completes once the server has shut down; drive it on a tiny runtime.
            actix_web::rt::System::new().block_on(async move { handle.stop(true).await });
            let _ = thread.join();
            if let Some(amqp) = &self.bound.amqp {
                amqp.shutdown();
            }
            self.bound.mqtt_listener.shutdown();
            if let Some(hub) = &self.bound.hub {
                // Flush and stop the telemetry writer, so a restart in this process reopens cleanly.
                hub.telemetry.shutdown();
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}
