//! The ways domain code uses the store beyond single calls: an optimistic-concurrency
//! read-modify-write of one document ([`DocumentStore::update`]) or of a batch of them in one
//! transaction ([`DocumentStore::update_each`]), and running store calls from async code
//! ([`blocking`]).

use std::collections::HashSet;
use std::sync::{Arc, Condvar, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;

use super::{Collection, Document, DocumentStore, StoreError, Write};

/// How often [`DocumentStore::update`] reads again after a concurrent writer got there first
/// before it gives up with [`StoreError::Unavailable`].
pub const UPDATE_ATTEMPTS: usize = 16;
/// The longest pause between two attempts: a random pause, up to twice the previous bound,
/// spreads writers that keep colliding on one document.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// What the caller of [`DocumentStore::update_from`] knows of the document.
#[derive(Debug)]
pub enum Read {
    /// Nothing: read it.
    No,
    /// It was this (`None`: missing) a moment ago.
    Was(Option<Document>),
}

/// What a read-modify-write decided.
#[derive(Debug)]
pub enum Change<T> {
    /// Store `body` (under `parent`): a create when there was no document, else a write
    /// conditioned on the etag read.
    Put {
        body: Value,
        parent: Option<String>,
        result: T,
    },
    /// Delete the document that was read, conditioned on its etag.
    Delete(T),
    /// Write nothing.
    Keep(T),
}

impl<T> Change<T> {
    /// Stores `body` without a parent.
    pub fn put(body: Value, result: T) -> Change<T> {
        Change::Put {
            body,
            parent: None,
            result,
        }
    }
}

/// The outcome of [`DocumentStore::update`]: what the change returned, and the document as it
/// is now (`None` when there is none, or it was deleted).
#[derive(Debug)]
pub struct Updated<T> {
    pub result: T,
    pub document: Option<Document>,
}

impl dyn DocumentStore {
    /// Reads the document (`None` if there is none), lets `change` decide what to do with it,
    /// and does it conditioned on what was read: a create when it was missing, a write or
    /// delete under its etag otherwise. When another writer changed, created or deleted the
    /// document in between, it pauses a random moment, reads again and asks `change` again, so
    /// `change` must be a function of the document it is given. Gives up after
    /// [`UPDATE_ATTEMPTS`] with [`StoreError::Unavailable`] (turned into `E`).
    pub fn update<T, E>(
        &self,
        collection: Collection,
        id: &str,
        change: impl FnMut(Option<&Document>) -> Result<Change<T>, E>,
    ) -> Result<Updated<T>, E>
    where
        E: From<StoreError>,
    {
        self.update_from(collection, id, Read::No, change)
    }

    /// [`update`](Self::update) whose first attempt starts from `read`, the document as the
    /// caller read it a moment ago (`Read::Was(None)`: it did not exist), instead of reading
    /// it again: one round trip less. The etag condition still catches a change since then,
    /// and the next attempt reads afresh.
    pub fn update_from<T, E>(
        &self,
        collection: Collection,
        id: &str,
        read: Read,
        mut change: impl FnMut(Option<&Document>) -> Result<Change<T>, E>,
    ) -> Result<Updated<T>, E>
    where
        E: From<StoreError>,
    {
        let _turn = Turn::take(collection, id);
        let mut read = Some(read);
        for attempt in 0..UPDATE_ATTEMPTS {
            if attempt > 0 {
                pause(attempt);
            }
            let current = match read.take() {
                Some(Read::Was(document)) => document,
                _ => self.get(collection, id)?,
            };
            let written = match change(current.as_ref())? {
                Change::Keep(result) => {
                    return Ok(Updated {
                        result,
                        document: current,
                    });
                }
                Change::Put {
                    body,
                    parent,
                    result,
                } => {
                    let write = match &current {
                        Some(doc) => Write::IfMatch(doc.etag.clone()),
                        None => Write::Create,
                    };
                    self.put(collection, id, parent.as_deref(), &body, write)
                        .map(|doc| (result, Some(doc)))
                }
                Change::Delete(result) => match &current {
                    None => {
                        return Ok(Updated {
                            result,
                            document: None,
                        });
                    }
                    Some(doc) => self
                        .delete(collection, id, Some(&doc.etag))
                        .map(|_| (result, None)),
                },
            };
            match written {
                Ok((result, document)) => return Ok(Updated { result, document }),
                // Changed, created or deleted by someone else since the read: read again.
                Err(
                    StoreError::PreconditionFailed | StoreError::Conflict | StoreError::NotFound,
                ) => continue,
                Err(other) => return Err(other.into()),
            }
        }
        Err(StoreError::Unavailable(format!(
            "{} `{id}` kept changing under {UPDATE_ATTEMPTS} read-modify-writes",
            collection.table_name()
        ))
        .into())
    }

    /// [`DocumentStore::update_batch`] while holding this process's turn on each of the
    /// documents, so that single read-modify-writes of them ([`update`](DocumentStore::update))
    /// wait for the batch instead of losing their etag race to it. Turns are taken in key
    /// order, before a connection: no two batches, nor a batch and a single update, can wait
    /// for each other in a circle.
    pub fn update_each(
        &self,
        collection: Collection,
        ids: &[&str],
        change: &mut dyn FnMut(usize, Option<&Document>) -> Option<Value>,
    ) -> Result<Vec<Result<Option<Document>, StoreError>>, StoreError> {
        let mut keys: Vec<String> = ids
            .iter()
            .map(|id| super::store::id_key(collection, id))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let _turns: Vec<Turn> = keys
            .into_iter()
            .map(|key| Turn::take_key((collection, key)))
            .collect();
        self.update_batch(collection, ids, change)
    }
}

/// The documents a read-modify-write of this process is working on. Writers in one process
/// take turns on a document instead of racing for it: a loser's random pauses cannot keep up
/// with fresh writers on a busy machine, so under eight-way contention on two cores a writer
/// could lose [`UPDATE_ATTEMPTS`] races in a row and give up. The etag condition still settles
/// races with other processes (replicas, the CLI). A change must not update its own document
/// again (it would wait for itself); no change in this crate updates any document.
static BUSY: LazyLock<Busy> = LazyLock::new(Busy::default);

#[derive(Default)]
struct Busy {
    documents: Mutex<HashSet<(Collection, String)>>,
    released: Condvar,
}

/// This process's turn on one document, released on drop.
struct Turn {
    key: (Collection, String),
}

impl Turn {
    fn take(collection: Collection, id: &str) -> Turn {
        Turn::take_key((collection, super::store::id_key(collection, id)))
    }

    fn take_key(key: (Collection, String)) -> Turn {
        let mut busy = BUSY
            .documents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while busy.contains(&key) {
            busy = BUSY
                .released
                .wait(busy)
                .unwrap_or_else(PoisonError::into_inner);
        }
        busy.insert(key.clone());
        Turn { key }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        BUSY.documents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
        BUSY.released.notify_all();
    }
}

/// Sleeps a random moment, up to 1 ms doubled per lost race, at most [`MAX_PAUSE`].
fn pause(lost: usize) {
    let bound = Duration::from_millis(1 << lost.min(6)).min(MAX_PAUSE);
    std::thread::sleep(bound.mul_f64(rand::random::<f64>()));
}

/// Runs synchronous store calls on tokio's blocking pool, for async callers. A task that
/// panicked is a [`StoreError::Backend`]. Calls that end in a domain error of their own (an
/// [`update`](DocumentStore::update) whose change refuses, say) return it inside the `Ok`:
/// `blocking(&store, |s| Ok(s.update(…))).await??`.
pub async fn blocking<T, F>(store: &Arc<dyn DocumentStore>, f: F) -> Result<T, StoreError>
where
    F: FnOnce(&dyn DocumentStore) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| StoreError::Backend(format!("a storage task failed: {e}")))?
}
