//! Replica mode's transport: the replicas of one hub reach each other through NATS
//! (docs/deployment.md, "Replicas"). This module knows subjects and NATS; what an order means
//! to a device's connection is the hub's business (`hub::replicas`).
//!
//! Subjects, under `cluster.subject_prefix` (`zerotouch` by default):
//! - `{prefix}.device.{hex of the device id}.{order}`: orders for the replica holding the
//!   device's connection. That replica subscribes to `{prefix}.device.{hex}.*` for as long as
//!   it holds the connection, so NATS routes each order to it alone, and a request nobody holds
//!   fails at once with "no responders". Device ids may contain `.` and `*`, which subjects
//!   cannot, hence the hex.
//! - `{prefix}.revoked`: every replica, a revoked certificate's serial (hex).
//! - `{prefix}.replicas`: every replica says it is alive every [`HEARTBEAT`] (its name); a
//!   replica not heard from for three heartbeats is gone from [`Cluster::members`].

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::ClusterSettings;

/// How long a replica waits for NATS at start before giving up with an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a replica tells the others it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How long start-up retries a JetStream step: a NATS cluster that has just started needs a
/// few seconds to elect its JetStream leader.
const JETSTREAM_START: Duration = Duration::from_secs(30);

/// Runs `step` until it succeeds or [`JETSTREAM_START`] has passed (then its last error).
pub async fn at_start<T, E, F, Fut>(what: &str, mut step: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + JETSTREAM_START;
    loop {
        match step().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!("{what}: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What one replica asks of the replica that holds a device's connection: the last token of
/// the device subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A newer connection of this device opened elsewhere: an older one closes.
    Takeover,
    /// Close the connection (revoked, disabled, deleted, new credentials).
    Close,
    /// Cloud-to-device messages are waiting in the shared queue.
    C2d,
    /// A desired-properties patch to push.
    Desired,
    /// A direct-method call (request/reply).
    Method,
    /// The connection's state for the registry (request/reply).
    State,
}

impl Order {
    const ALL: [Order; 6] = [
        Order::Takeover,
        Order::Close,
        Order::C2d,
        Order::Desired,
        Order::Method,
        Order::State,
    ];

    pub fn token(self) -> &'static str {
        match self {
            Order::Takeover => "takeover",
            Order::Close => "close",
            Order::C2d => "c2d",
            Order::Desired => "desired",
            Order::Method => "method",
            Order::State => "state",
        }
    }

    /// The order of a device subject, from its last token.
    pub fn of_subject(subject: &str) -> Option<Order> {
        let last = subject.rsplit('.').next()?;
        Order::ALL.into_iter().find(|o| o.token() == last)
    }
}

/// Why a request to another replica failed (not "nobody holds the device": that is `None`).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the replica holding the device did not answer in time")]
    TimedOut,
    #[error("NATS: {0}")]
    Nats(String),
}

/// This replica's NATS connection and names.
pub struct Cluster {
    client: async_nats::Client,
    prefix: String,
    replica: String,
    /// The runtime the orders are sent and served on, so that code on any thread (a blocking
    /// store call, an MQTT worker) can hand one over.
    runtime: tokio::runtime::Handle,
    /// Replicas heard from, with when.
    seen: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, std::time::Instant>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica", &self.replica)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// `{host name}-{pid}`: unique among replicas on different hosts and among processes on one.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let host = if host.is_empty() {
        "replica".into()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

impl Cluster {
    /// Connects to NATS (the first reachable of `settings.nats_url`); afterwards the client
    /// reconnects by itself whenever the connection drops. Must run on the runtime that will
    /// serve the orders.
    pub async fn connect(settings: &ClusterSettings) -> anyhow::Result<Cluster> {
        let replica = settings
            .replica
            .clone()
            .unwrap_or_else(default_replica_name);
        let urls = settings.nats_url.join(",");
        let servers = settings
            .nats_url
            .iter()
            .map(|url| {
                url.parse::<async_nats::ServerAddr>()
                    .map_err(|e| anyhow::anyhow!("cluster.nats_url {url:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("zerotouch {replica}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {urls} (cluster.nats_url): {e}"))?;
        let cluster = Cluster {
            client,
            prefix: settings.subject_prefix.clone(),
            replica,
            runtime: tokio::runtime::Handle::current(),
            seen: Default::default(),
        };
        cluster.start_heartbeats().await?;
        Ok(cluster)
    }

    fn members_subject(&self) -> String {
        format!("{}.replicas", self.prefix)
    }

    /// Says this replica is alive every [`HEARTBEAT`], and notes who else does.
    async fn start_heartbeats(&self) -> anyhow::Result<()> {
        let mut heard = self
            .client
            .subscribe(self.members_subject())
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to {}: {e}", self.members_subject()))?;
        let seen = std::sync::Arc::downgrade(&self.seen);
        self.runtime.spawn(async move {
            while let Some(message) = heard.next().await {
                let Some(seen) = seen.upgrade() else { return };
                if let Ok(name) = std::str::from_utf8(&message.payload) {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    seen.insert(name.to_string(), std::time::Instant::now());
                }
            }
        });
        let (client, subject, name) = (
            self.client.clone(),
            self.members_subject(),
            Bytes::from(self.replica.clone()),
        );
        let alive = std::sync::Arc::downgrade(&self.seen);
        self.runtime.spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            // Ends with the cluster (its `seen` map is gone).
            while alive.strong_count() > 0 {
                every.tick().await;
                let _ = client.publish(subject.clone(), name.clone()).await;
            }
        });
        Ok(())
    }

    /// The replicas heard from in the last three heartbeats, this one included, by name.
    pub fn members(&self) -> Vec<String> {
        let now = std::time::Instant::now();
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut members: Vec<String> = seen
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < 3 * HEARTBEAT)
            .map(|(name, _)| name.clone())
            .collect();
        if !members.contains(&self.replica) {
            members.push(self.replica.clone());
            members.sort();
        }
        members
    }

    /// The bucket `{prefix}_{name}` (dots in the prefix become `_`), created if missing, with
    /// entries kept for `max_age`.
    pub async fn bucket(
        &self,
        name: &str,
        max_age: Duration,
        replicas: usize,
    ) -> Result<Bucket, ClusterError> {
        let bucket = format!("{}_{name}", self.prefix.replace('.', "_"));
        let jetstream = async_nats::jetstream::new(self.client.clone());
        if let Ok(store) = jetstream.get_key_value(bucket.as_str()).await {
            return Ok(Bucket { store });
        }
        // The bucket's stream, made as the KV API makes it. Not through `create_key_value`:
        // that first reads the account info in a shape NATS 2.9 does not send.
        use async_nats::jetstream::stream;
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let created = at_start(&format!("creating the bucket {bucket}"), || {
            jetstream.get_or_create_stream(config.clone())
        })
        .await;
        if let Err(e) = created {
            return Err(ClusterError::Nats(format!(
                "creating the bucket {bucket}: {e}"
            )));
        }
        jetstream
            .get_key_value(bucket.as_str())
            .await
            .map(|store| Bucket { store })
            .map_err(|e| ClusterError::Nats(format!("opening the bucket {bucket}: {e}")))
    }

    /// `cluster.subject_prefix`.
    pub fn subject_prefix(&self) -> &str {
        &self.prefix
    }

    /// JetStream on this connection.
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        )
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    fn device_subject(&self, device_id: &str, token: &str) -> String {
        format!(
            "{}.device.{}.{token}",
            self.prefix,
            hex::encode(device_id.as_bytes())
        )
    }

    fn revoked_subject(&self) -> String {
        format!("{}.revoked", self.prefix)
    }

    /// Sends an order to whichever replica holds the device; nobody holds it: dropped.
    pub async fn tell(&self, device_id: &str, order: Order, payload: Bytes) {
        let subject = self.device_subject(device_id, order.token());
        if let Err(e) = self.client.publish(subject, payload).await {
            tracing::warn!(device_id, order = order.token(), "NATS publish failed: {e}");
        }
    }

    /// The same, from any thread and without waiting.
    pub fn tell_soon(self: &std::sync::Arc<Self>, device_id: &str, order: Order, payload: Bytes) {
        let cluster = self.clone();
        let device_id = device_id.to_string();
        self.runtime
            .spawn(async move { cluster.tell(&device_id, order, payload).await });
    }

    /// Asks the replica holding the device and waits up to `timeout` for its answer;
    /// `Ok(None)`: no replica holds the device.
    pub async fn ask(
        &self,
        device_id: &str,
        order: Order,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Bytes>, ClusterError> {
        use async_nats::RequestErrorKind;
        let subject = self.device_subject(device_id, order.token());
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(message) => Ok(Some(message.payload)),
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => Ok(None),
                RequestErrorKind::TimedOut => Err(ClusterError::TimedOut),
                _ => Err(ClusterError::Nats(e.to_string())),
            },
        }
    }

    /// Answers a request received by [`Cluster::listen`].
    pub async fn answer(&self, reply_to: async_nats::Subject, payload: Bytes) {
        if let Err(e) = self.client.publish(reply_to, payload).await {
            tracing::warn!("NATS reply failed: {e}");
        }
    }

    /// The orders for one device, for as long as the stream is held (dropping it
    /// unsubscribes).
    pub async fn listen(&self, device_id: &str) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(self.device_subject(device_id, "*"))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))
    }

    /// Tells every replica that a certificate was revoked.
    pub fn announce_revocation(self: &std::sync::Arc<Self>, serial: &str) {
        let cluster = self.clone();
        let payload = Bytes::from(serial.to_string());
        self.runtime.spawn(async move {
            if let Err(e) = cluster
                .client
                .publish(cluster.revoked_subject(), payload)
                .await
            {
                tracing::warn!("NATS publish of a revocation failed: {e}");
            }
        });
    }

    /// Calls `revoked` with the serial of every revocation announced by any replica
    /// (this one included), until the connection is gone.
    pub async fn on_revocation(
        &self,
        revoked: impl Fn(&str) + Send + 'static,
    ) -> Result<(), ClusterError> {
        let mut subscriber = self
            .client
            .subscribe(self.revoked_subject())
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        self.runtime.spawn(async move {
            while let Some(message) = subscriber.next().await {
                if let Ok(serial) = std::str::from_utf8(&message.payload) {
                    revoked(serial);
                }
            }
        });
        Ok(())
    }
}

/// A JetStream key-value bucket shared by the replicas (keys are hex-encoded, so any text
/// will do). Entries expire after the bucket's age limit.
pub struct Bucket {
    store: async_nats::jetstream::kv::Store,
}

impl Bucket {
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ClusterError> {
        self.store
            .get(hex::encode(key))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))
    }

    pub async fn put(&self, key: &str, value: Bytes) -> Result<(), ClusterError> {
        self.store
            .put(hex::encode(key), value)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Nats(e.to_string()))
    }

    /// Adds one to the counter under `key` (0 when missing) and returns the new count; a
    /// concurrent increment by another replica makes it try again (compare-and-set on the
    /// entry's revision).
    pub async fn increment(&self, key: &str) -> Result<u64, ClusterError> {
        let key = hex::encode(key);
        let nats = |e: &dyn std::fmt::Display| ClusterError::Nats(e.to_string());
        for _ in 0..8 {
            let entry = self.store.entry(key.as_str()).await.map_err(|e| nats(&e))?;
            // Only a lost race (someone wrote first) is worth another round; any other failure
            // (a timeout while JetStream elects a leader) is the caller's to handle, now.
            let written = match entry
                .filter(|e| matches!(e.operation, async_nats::jetstream::kv::Operation::Put))
            {
                None => match self
                    .store
                    .create(key.as_str(), Bytes::from_static(b"1"))
                    .await
                {
                    Ok(_) => Some(1),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                    Err(e) => return Err(nats(&e)),
                },
                Some(entry) => {
                    let count = std::str::from_utf8(&entry.value)
                        .ok()
                        .and_then(|t| t.parse::<u64>().ok())
                        .unwrap_or(0)
                        + 1;
                    match self
                        .store
                        .update(key.as_str(), count.to_string().into(), entry.revision)
                        .await
                    {
                        Ok(_) => Some(count),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => None,
                        Err(e) => return Err(nats(&e)),
                    }
                }
            };
            if let Some(count) = written {
                return Ok(count);
            }
        }
        Err(ClusterError::Nats(
            "a shared counter kept changing under us".into(),
        ))
    }

    pub async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        self.store
            .delete(hex::encode(key))
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_trip_through_their_subject_token() {
        for order in Order::ALL {
            let subject = format!("zerotouch.device.6162.{}", order.token());
            assert_eq!(Order::of_subject(&subject), Some(order));
        }
        assert_eq!(Order::of_subject("zerotouch.device.6162.reboot"), None);
    }

    #[test]
    fn replica_names_are_subject_safe() {
        let name = default_replica_name();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{name}"
        );
    }
}
