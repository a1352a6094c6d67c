//! The device MQTT listener (MQTT 3.1.1 over TLS, port 8883 by default): accepts TCP
//! connections on the current tokio runtime (actix's, in the service) and runs one task per
//! connection (see `connection.rs`) on the worker threads (`workers.rs`), handing sockets to
//! them in turn. The listener creates the `Engine` (`engine.rs`) that its connections share;
//! `connection.rs` knows the engine, never the listener.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::Application;
use super::connection;
use super::engine::{Engine, TaskGuard};
use super::workers::Workers;
use crate::db::DocumentStore;

pub use super::engine::MqttLimits;

/// A running listener. Cloning gives another handle to the same listener; dropping the handles
/// does not stop it (call [`MqttListener::shutdown`]).
#[derive(Clone)]
pub struct MqttListener {
    engine: Arc<Engine>,
    local_addr: SocketAddr,
    workers: usize,
    running: Arc<AtomicUsize>,
}

impl MqttListener {
    /// Threads that run connections.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Worker threads that have not ended yet: all of them until shutdown, then none once
    /// their connections have closed.
    pub fn workers_running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

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
        self.engine.shutdown();
    }

    /// Resolves once the listening socket is closed and every connection task has ended.
    pub async fn stopped(&self) {
        self.engine.stopped().await;
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

/// Binds `addr` and serves MQTT until [`MqttListener::shutdown`]: accepts on the current tokio
/// runtime and runs connections on `limits.workers` threads of their own.
///
/// `app` decides every CONNECT; persistent sessions live in `sessions` (collection
/// `MqttSessions`).
pub async fn start(
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    app: Arc<dyn Application>,
    sessions: Arc<dyn DocumentStore>,
    limits: MqttLimits,
) -> std::io::Result<MqttListener> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let engine = Arc::new(Engine::new(app, sessions, limits, acceptor));
    let workers = match Workers::start(engine.limits.workers, &engine) {
        Ok(workers) => workers,
        Err(e) => {
            // Lets the workers already started end.
            engine.shutdown();
            return Err(e);
        }
    };
    let (count, running) = (workers.len(), workers.running());
    let guard = TaskGuard::new(&engine);
    tokio::spawn(accept_loop(listener, engine.clone(), workers, guard));
    tracing::info!(%local_addr, workers = count, "MQTT listener started");
    Ok(MqttListener {
        engine,
        local_addr,
        workers: count,
        running,
    })
}

async fn accept_loop(
    listener: TcpListener,
    engine: Arc<Engine>,
    workers: Workers,
    _guard: TaskGuard,
) {
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
                workers.hand_over(tcp, move |tcp| async move {
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
