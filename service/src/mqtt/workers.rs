//! The threads that run MQTT connections: one event loop (a current-thread tokio runtime) per
//! worker, each on its own thread. The listener accepts on its own runtime and hands every
//! accepted socket to the next worker in turn, so TLS handshakes, packet handling and the
//! application's calls run on all cores, and each connection stays on one thread for its whole
//! life (no cross-thread wake-ups on its hot path).
//!
//! What connections share across workers (the session registry, the rate limiter, the
//! application's own state) is behind locks; see `engine.rs`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;

use super::engine::Engine;

/// Tasks that one worker may run at once on tokio's blocking pool (store calls). The store's
/// connection pool bounds real concurrency; this only bounds idle threads.
const BLOCKING_THREADS_PER_WORKER: usize = 64;

pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Worker threads that have not ended yet.
    running: Arc<AtomicUsize>,
}

impl Workers {
    /// Starts `count` workers (at least one). Each runs until `engine` has shut down and every
    /// task it counts has ended.
    pub fn start(count: usize, engine: &Arc<Engine>) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(count.max(1));
        let running = Arc::new(AtomicUsize::new(0));
        for index in 0..count.max(1) {
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            let engine = engine.clone();
            running.fetch_add(1, Ordering::SeqCst);
            let ended = Ended(running.clone());
            std::thread::Builder::new()
                .name(format!("mqtt-worker-{index}"))
                .spawn(move || {
                    let _ended = ended;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .max_blocking_threads(BLOCKING_THREADS_PER_WORKER)
                        .build();
                    let runtime = match runtime {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        engine.shutdown_signal().await;
                        engine.stopped().await;
                    });
                })?;
            handles.push(handle.recv().map_err(|_| {
                std::io::Error::other("an MQTT worker thread ended while starting")
            })??);
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            running,
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// The count of worker threads still running, which outlives `self`.
    pub fn running(&self) -> Arc<AtomicUsize> {
        self.running.clone()
    }

    /// Runs `serve` for an accepted socket on the next worker. The socket moves between event
    /// loops as a standard socket and is registered with the worker's own.
    pub fn hand_over<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!("handing a socket to an MQTT worker failed: {e}");
                return;
            }
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => tracing::warn!("an MQTT worker could not take a socket: {e}"),
            }
        });
    }
}

/// Counts a worker thread down when it ends (also when it could not start).
struct Ended(Arc<AtomicUsize>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
