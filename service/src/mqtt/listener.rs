//! The device MQTT listener (MQTT 3.1.1 over TLS, port 8883 by default): accepts TCP
//! connections and runs one task per connection (see `connection.rs`) on the current tokio
//! runtime (actix's, in the service).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::SslAcceptor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Application;
use super::connection;
use super::sessions::{RateLimiter, Registry};
use crate::db::DocumentStore;

pub use super::outbound::Outbound;

/// Limits of the MQTT engine. `Default` gives the production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttLimits {
    /// Largest packet accepted from a client (its remaining length); larger ones close the
    /// connection as soon as their header arrives. Default 264 KiB: a 256 KiB message plus
    /// room for a long topic.
    pub max_packet_bytes: usize,
    /// Time from the end of the TLS handshake to the CONNECT packet.
    pub connect_timeout: Duration,
    /// Subscriptions per connection; more are refused with SUBACK 0x80. Azure allows 5; the
    /// Python SDK uses at most 4.
    pub max_subscriptions: usize,
    /// Outbound QoS 1 messages awaiting PUBACK per connection; more wait in the queue.
    pub max_inflight_outbound: usize,
    /// Connection attempts per session key in any 60 s; beyond that CONNACK 0x03. 0: no limit.
    pub reconnects_per_minute: u32,
    /// Outbound messages queued per connection before `Outbound::publish` waits.
    pub outbound_queue: usize,
    /// An outbound QoS 1 message without PUBACK after this long is sent again with DUP=1 on
    /// the same connection.
    pub retransmit_after: Duration,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_packet_bytes: 256 * 1024 + 8 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_subscriptions: 8,
            max_inflight_outbound: 64,
            reconnects_per_minute: 30,
            outbound_queue: 256,
            retransmit_after: Duration::from_secs(20),
        }
    }
}

/// Everything connections share.
pub(crate) struct Engine {
    pub app: Arc<dyn Application>,
    pub store: Arc<dyn DocumentStore>,
    pub limits: MqttLimits,
    pub acceptor: SslAcceptor,
    pub registry: Registry,
    pub rate: RateLimiter,
    shutdown: watch::Sender<bool>,
    /// Running tasks: the accept loop and every connection.
    tasks: watch::Sender<usize>,
}

impl Engine {
    /// Resolves once the listener is shutting down.
    pub async fn shutdown_signal(&self) {
        let mut shutdown = self.shutdown.subscribe();
        // The sender lives in `self`, so this only returns once shutdown is requested.
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    }
}

/// Counts a running task until dropped.
struct TaskGuard(Arc<Engine>);

impl TaskGuard {
    fn new(engine: &Arc<Engine>) -> TaskGuard {
        engine.tasks.send_modify(|n| *n += 1);
        TaskGuard(engine.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A running listener. Cloning gives another handle to the same listener; dropping the handles
/// does not stop it (call [`MqttListener::shutdown`]).
#[derive(Clone)]
pub struct MqttListener {
    engine: Arc<Engine>,
    local_addr: SocketAddr,
}

impl MqttListener {
    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections that completed CONNECT and hold a session now.
    pub fn connected_count(&self) -> usize {
        self.engine.registry.len()
    }

    /// Stops accepting and closes every connection (`Session::closed` gets
    /// [`ServerShutdown`](super::CloseReason::ServerShutdown)). Returns at once; see
    /// [`MqttListener::stopped`].
    pub fn shutdown(&self) {
        self.engine.shutdown.send_replace(true);
    }

    /// Resolves once the listening socket is closed and every connection task has ended.
    pub async fn stopped(&self) {
        let mut tasks = self.engine.tasks.subscribe();
        let _ = tasks.wait_for(|running| *running == 0).await;
    }
}

impl fmt::Debug for MqttListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttListener")
            .field("local_addr", &self.local_addr)
            .field("connected", &self.connected_count())
            .finish()
    }
}

/// Binds `addr` and serves MQTT on the current tokio runtime until [`MqttListener::shutdown`].
///
/// `app` decides every CONNECT; persistent sessions live in `sessions` (collection
/// `MqttSessions`).
pub async fn start(
    addr: SocketAddr,
    acceptor: SslAcceptor,
    app: Arc<dyn Application>,
    sessions: Arc<dyn DocumentStore>,
    limits: MqttLimits,
) -> std::io::Result<MqttListener> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let engine = Arc::new(Engine {
        app,
        store: sessions,
        rate: RateLimiter::per_minute(limits.reconnects_per_minute),
        limits,
        acceptor,
        registry: Registry::default(),
        shutdown: watch::Sender::new(false),
        tasks: watch::Sender::new(0),
    });
    let guard = TaskGuard::new(&engine);
    tokio::spawn(accept_loop(listener, engine.clone(), guard));
    tracing::info!(%local_addr, "MQTT listener started");
    Ok(MqttListener { engine, local_addr })
}

async fn accept_loop(listener: TcpListener, engine: Arc<Engine>, _guard: TaskGuard) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = engine.shutdown_signal() => break,
        };
        match accepted {
            Ok((tcp, remote)) => {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%remote, "setting TCP_NODELAY failed: {e}");
                }
                let guard = TaskGuard::new(&engine);
                let engine = engine.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    connection::serve(engine, tcp, remote).await;
                });
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!("MQTT accept failed: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = engine.shutdown_signal() => break,
                }
            }
        }
    }
    tracing::info!("MQTT listener stopped accepting");
}
