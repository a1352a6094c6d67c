//! Devices' reported-property patches, stored in batches.
//!
//! A reported patch is a read-modify-write of the device's twin. Done one by one, each took a
//! blocking-pool thread, a pooled connection, the SQLite writer lock and a transaction of its
//! own, and the threads spent more time waking each other than writing. Here one writer thread
//! takes the first queued patch and whatever else is queued (at most [`MAX_BATCH`]), applies
//! them in arrival order in one transaction ([`DocumentStore::update_each`]) and commits once;
//! only then does each device get its answer. Two patches of one device in a batch apply in
//! order, the second to the twin the first wrote.
//!
//! A patch its twin refuses (too deep, too large) fails alone; when the transaction fails,
//! every patch in it gets the error and nothing of it is stored.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use zerotouch_twin::document::Twin;

use super::error::{HubError, HubErrorCode};
use crate::db::{Collection, DocumentStore};

/// At most this many patches per transaction.
pub const MAX_BATCH: usize = 256;

/// One patch waiting for the writer.
struct Pending {
    device_id: String,
    patch: Value,
    /// When it arrived (RFC 3339), for the metadata `$lastUpdated`.
    now: String,
    reply: oneshot::Sender<Result<u64, HubError>>,
}

/// The queue to the writer thread, which ends when this is dropped.
pub(crate) struct ReportedWriter {
    queue: mpsc::UnboundedSender<Pending>,
}

impl ReportedWriter {
    /// Starts the writer thread. Callers bound what is queued (the hub's twin slots).
    pub(crate) fn start(store: Arc<dyn DocumentStore>) -> ReportedWriter {
        let (queue, pending) = mpsc::unbounded_channel();
        let spawned = std::thread::Builder::new()
            .name("twin-writer".to_owned())
            .spawn(move || run(store.as_ref(), pending));
        if let Err(e) = spawned {
            // The receiver is gone with the closure: every patch gets `writer_gone`.
            tracing::error!("cannot start the twin writer thread: {e}");
        }
        ReportedWriter { queue }
    }

    /// Merges `patch` into the device's reported properties (creating the twin if there is
    /// none) and returns the new reported `$version` once it is committed.
    pub(crate) async fn patch(
        &self,
        device_id: &str,
        patch: Value,
        now: String,
    ) -> Result<u64, HubError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            device_id: device_id.to_owned(),
            patch,
            now,
            reply,
        };
        self.queue.send(pending).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }
}

/// The writer thread is not running, or dropped the patch's answer (it panicked).
fn writer_gone() -> HubError {
    HubError::internal("the twin writer did not store the patch")
}

fn run(store: &dyn DocumentStore, mut pending: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = pending.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A panic (a bug) fails this batch's patches, whose answers are dropped with it,
        // and not every later one: the thread goes on, as a blocking-pool task's panic only
        // failed its own request.
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write(store, batch);
        }));
        if written.is_err() {
            tracing::error!("the twin writer panicked storing a batch of reported patches");
        }
    }
}

/// Applies and commits one batch, then answers each patch.
fn write(store: &dyn DocumentStore, batch: Vec<Pending>) {
    let ids: Vec<&str> = batch.iter().map(|p| p.device_id.as_str()).collect();
    let mut versions: Vec<Option<Result<u64, HubError>>> = batch.iter().map(|_| None).collect();
    let stored = store.update_each(Collection::Twins, &ids, &mut |i, doc| {
        let (twin, version) = apply(&batch[i], doc.map(|d| &d.body));
        versions[i] = Some(version);
        twin.map(|twin| twin.to_value())
    });
    match stored {
        Ok(outcomes) => {
            for ((p, outcome), version) in batch.into_iter().zip(outcomes).zip(versions) {
                let answer = match (outcome, version) {
                    (Err(e), _) => Err(HubError::from(e)),
                    (Ok(_), Some(version)) => version,
                    (Ok(_), None) => Err(HubError::internal("a reported patch was not applied")),
                };
                // A device that disconnected meanwhile no longer waits for its answer.
                let _ = p.reply.send(answer);
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(HubError::from(e.clone())));
            }
        }
    }
}

/// The twin with `p` applied (`None` when it refuses the patch) and the outcome for the device.
fn apply(p: &Pending, stored: Option<&Value>) -> (Option<Twin>, Result<u64, HubError>) {
    let twin = match stored {
        Some(body) => Twin::from_value(body),
        None => Twin::new(None, &p.now),
    };
    let mut twin = match twin {
        Ok(twin) => twin,
        Err(e) => return (None, Err(HubError::internal(e))),
    };
    match twin.patch_reported(&p.patch, &p.now) {
        Ok(version) => (Some(twin), Ok(version)),
        Err(e) => (
            None,
            Err(HubError::new(HubErrorCode::ArgumentInvalid, e.to_string())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A patch nested deeper than a twin may hold.
    fn too_deep() -> Value {
        (0..=zerotouch_twin::document::MAX_DEPTH + 1)
            .fold(json!(1), |inner, _| json!({ "n": inner }))
    }

    /// Many devices' patches arrive together: they are stored in batches, each device's in
    /// the order sent, and a patch its twin refuses fails alone.
    #[tokio::test]
    async fn concurrent_patches_are_batched_in_order_and_fail_alone() {
        let fixture = crate::dps::testing::Fixture::new();
        let hub = &fixture.hub;
        const DEVICES: usize = 20;
        const PATCHES: u64 = 10;
        let sends = (0..DEVICES).flat_map(|d| {
            (0..PATCHES).map(move |k| async move {
                let device = format!("dev-{d}");
                let patch = json!({ "last": k, format!("p{k}"): k });
                (d, k, hub.patch_reported(&device, patch).await)
            })
        });
        let refused = hub.patch_reported("dev-0", too_deep());
        let (answers, refused) = tokio::join!(futures_util::future::join_all(sends), refused);

        let refused = refused.unwrap_err();
        assert_eq!(refused.code, HubErrorCode::ArgumentInvalid);
        for (d, k, answer) in answers {
            // The first reported $version of a new twin is 1; each patch adds one.
            assert_eq!(answer.unwrap(), k + 2, "device {d}, patch {k}");
        }
        for d in 0..DEVICES {
            let view = hub.twin(&format!("dev-{d}")).await.unwrap().device_view();
            let reported = &view["reported"];
            assert_eq!(reported["$version"], json!(PATCHES + 1));
            assert_eq!(reported["last"], json!(PATCHES - 1));
            for k in 0..PATCHES {
                assert_eq!(reported[format!("p{k}")], json!(k));
            }
            assert!(reported.get("n").is_none());
        }
    }
}
