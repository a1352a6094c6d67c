//! Sessions across connections: who is connected under which session key (takeover), how
//! often a key reconnects (rate limit), and persistent subscriptions in the document store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::outbound::Shared;
use super::{QoS, topic};
use crate::db::{Collection, DocumentStore, StoreError, Write, blocking};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Live connections by session key: at most one per key.
#[derive(Default)]
pub(crate) struct Registry {
    live: Mutex<HashMap<String, Arc<Shared>>>,
}

impl Registry {
    /// Registers `connection` under `key` and returns the connection it displaces, if any.
    pub fn insert(&self, key: &str, connection: Arc<Shared>) -> Option<Arc<Shared>> {
        lock(&self.live).insert(key.to_owned(), connection)
    }

    /// Unregisters `key` if it still belongs to connection `id` (a takeover may have replaced it).
    pub fn remove(&self, key: &str, id: u64) {
        let mut live = lock(&self.live);
        if live.get(key).is_some_and(|c| c.id == id) {
            live.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.live).len()
    }
}

/// Sliding-window limit on connection attempts per session key.
pub(crate) struct RateLimiter {
    per_window: usize,
    window: Duration,
    state: Mutex<RateState>,
}

struct RateState {
    attempts: HashMap<String, VecDeque<Instant>>,
    last_prune: Instant,
}

impl RateLimiter {
    /// `per_minute` attempts per key in any 60 s; 0 disables the limit.
    pub fn per_minute(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_window: usize::try_from(per_minute).unwrap_or(usize::MAX),
            window: Duration::from_secs(60),
            state: Mutex::new(RateState {
                attempts: HashMap::new(),
                last_prune: Instant::now(),
            }),
        }
    }

    /// Records an attempt for `key`; `false` if the key already made the allowed number of
    /// attempts within the window. Refused attempts count too, so a client that retries in a
    /// tight loop stays refused until it slows down.
    pub fn attempt(&self, key: &str) -> bool {
        if self.per_window == 0 {
            return true;
        }
        let now = Instant::now();
        let mut state = lock(&self.state);
        if now.duration_since(state.last_prune) > self.window {
            let window = self.window;
            state.attempts.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < window)
            });
            state.last_prune = now;
        }
        let times = state.attempts.entry(key.to_owned()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        let allowed = times.len() < self.per_window;
        times.push_back(now);
        while times.len() > self.per_window {
            times.pop_front();
        }
        allowed
    }
}

/// The stored form of a persistent session (collection `MqttSessions`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredSession {
    #[serde(default)]
    subscriptions: Vec<StoredSubscription>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSubscription {
    filter: String,
    qos: u8,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the storage task failed: {0}")]
    Task(String),
}

/// The stored subscriptions of `key`; `None` if no session is stored. Entries that are not
/// valid filters are dropped; at most `max` are returned.
pub(crate) async fn load(
    store: Arc<dyn DocumentStore>,
    key: &str,
    max: usize,
) -> Result<Option<Vec<(String, QoS)>>, SessionError> {
    let id = key.to_owned();
    let Some(document) = blocking(&store, move |s| s.get(Collection::MqttSessions, &id)).await?
    else {
        return Ok(None);
    };
    let stored: StoredSession = match serde_json::from_value(document.body) {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(
                session_key = key,
                "ignoring an unreadable stored MQTT session: {e}"
            );
            StoredSession::default()
        }
    };
    Ok(Some(
        stored
            .subscriptions
            .into_iter()
            .filter(|s| topic::valid_filter(&s.filter))
            .map(|s| {
                let qos = if s.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                (s.filter, qos)
            })
            .take(max)
            .collect(),
    ))
}

/// Stores the subscription set of `key` (replacing what was stored). `hold` is released only
/// once the write has finished, even if the caller stops waiting.
pub(crate) async fn save(
    store: Arc<dyn DocumentStore>,
    key: &str,
    subscriptions: Vec<(String, QoS)>,
    hold: tokio::sync::OwnedMutexGuard<()>,
) -> Result<(), SessionError> {
    let body = StoredSession {
        subscriptions: subscriptions
            .into_iter()
            .map(|(filter, qos)| StoredSubscription {
                filter,
                qos: qos_number(qos),
            })
            .collect(),
    };
    let body = serde_json::to_value(&body).map_err(|e| SessionError::Task(e.to_string()))?;
    let id = key.to_owned();
    blocking(&store, move |s| {
        let _hold = hold;
        s.put(Collection::MqttSessions, &id, None, &body, Write::Upsert)
            .map(|_| ())
    })
    .await?;
    Ok(())
}

/// Deletes the stored session of `key`, if any.
///
/// Most CleanSession=1 clients have no stored session, so it reads first: a read never waits
/// for a writer, while a delete (even of nothing) queues behind every write in flight, which
/// on SQLite under telemetry load held clean-session CONNECTs for up to seconds.
pub(crate) async fn delete(store: Arc<dyn DocumentStore>, key: &str) -> Result<(), SessionError> {
    let id = key.to_owned();
    blocking(&store, move |s| {
        if s.get(Collection::MqttSessions, &id)?.is_none() {
            return Ok(());
        }
        match s.delete(Collection::MqttSessions, &id, None) {
            Ok(_) | Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await?;
    Ok(())
}

pub(crate) fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_slides() {
        let limiter = RateLimiter {
            per_window: 2,
            window: Duration::from_millis(200),
            state: Mutex::new(RateState {
                attempts: HashMap::new(),
                last_prune: Instant::now(),
            }),
        };
        assert!(limiter.attempt("a"));
        assert!(limiter.attempt("a"));
        assert!(!limiter.attempt("a"));
        assert!(limiter.attempt("b"), "keys are independent");
        std::thread::sleep(Duration::from_millis(250));
        assert!(limiter.attempt("a"));
        assert!(RateLimiter::per_minute(0).attempt("x"));
    }
}
