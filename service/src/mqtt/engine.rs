//! What every connection of one listener shares: the [`Application`], the session store, the
//! limits, the TLS acceptor, the live-session registry, the reconnect rate limiter, and the
//! shutdown and task-count signals. Connections run on several worker threads at once
//! (`workers.rs`), so everything here is `Sync` and every shared map is behind a lock.
//!
//! `listener.rs` creates the engine and hands it to `connection::serve` for each accepted
//! connection; both depend on this file and neither on the other.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::Application;
use super::sessions::{RateLimiter, Registry};
use crate::db::DocumentStore;

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
    /// Threads that run connections, each with its own event loop (`workers.rs`). Default:
    /// the number of cores.
    pub workers: usize,
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
            workers: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// Everything connections share.
pub(crate) struct Engine {
    pub app: Arc<dyn Application>,
    pub store: Arc<dyn DocumentStore>,
    pub limits: MqttLimits,
    pub acceptor: TlsAcceptor,
    pub registry: Registry,
    pub rate: RateLimiter,
    shutdown: watch::Sender<bool>,
    /// Running tasks: the accept loop and every connection.
    tasks: watch::Sender<usize>,
}

impl Engine {
    pub fn new(
        app: Arc<dyn Application>,
        store: Arc<dyn DocumentStore>,
        limits: MqttLimits,
        acceptor: TlsAcceptor,
    ) -> Engine {
        Engine {
            app,
            store,
            rate: RateLimiter::per_minute(limits.reconnects_per_minute),
            limits,
            acceptor,
            registry: Registry::default(),
            shutdown: watch::Sender::new(false),
            tasks: watch::Sender::new(0),
        }
    }

    /// Asks the accept loop and every connection to stop.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once every task counted by a [`TaskGuard`] has ended.
    pub async fn stopped(&self) {
        let mut tasks = self.tasks.subscribe();
        let _ = tasks.wait_for(|running| *running == 0).await;
    }

    /// Resolves once the listener is shutting down.
    pub async fn shutdown_signal(&self) {
        let mut shutdown = self.shutdown.subscribe();
        // The sender lives in `self`, so this only returns once shutdown is requested.
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    }
}

/// Counts a running task (the accept loop, a connection) until dropped.
pub(crate) struct TaskGuard(Arc<Engine>);

impl TaskGuard {
    pub fn new(engine: &Arc<Engine>) -> TaskGuard {
        engine.tasks.send_modify(|n| *n += 1);
        TaskGuard(engine.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.send_modify(|n| *n = n.saturating_sub(1));
    }
}
