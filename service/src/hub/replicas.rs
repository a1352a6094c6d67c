//! The hub in replica mode: what it asks of the replica holding a device's connection, and how
//! it serves those orders for the connections it holds (`cluster` carries them over NATS).
//!
//! While a replica holds a device's connection it listens for that device's orders. When a
//! connection opens it announces itself with a takeover order stamped with its start time
//! (nanoseconds since the epoch) and replica name; of two connections of one device, the one
//! with the older stamp closes, wherever the two live. Both listen before announcing, so of
//! two overlapping connections at least one hears the other. A close order carries the time it
//! was given, and closes only connections older than that.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Hub;
use super::methods::{MethodCall, MethodOutcome};
use crate::cluster::{Cluster, Order};

/// How long the registry waits for another replica to report a connection's state.
const STATE_WAIT: Duration = Duration::from_millis(500);

/// Accepted CONNECTs of one device per minute across all replicas (each replica's engine also
/// allows `MqttLimits::reconnects_per_minute`, 30, on its own).
pub const SHARED_CONNECTS_PER_MINUTE: u64 = 30;

/// How long a CONNECT waits for the shared count. JetStream electing a new leader after a NATS
/// server is lost can take longer than a device waits for its CONNACK; the local limit covers
/// that time.
const SHARED_COUNT_WAIT: Duration = Duration::from_secs(2);

/// What the replicas count together.
pub(super) struct SharedLimits {
    connects: crate::cluster::Bucket,
}

/// A connection's place in the order of takeovers: newer wins; the replica name breaks ties.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    pub nanos: u64,
    pub replica: String,
}

impl Stamp {
    pub fn now(replica: &str) -> Stamp {
        let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        Stamp {
            nanos: u64::try_from(nanos).unwrap_or(0),
            replica: replica.to_string(),
        }
    }
}

/// A connection's state, as the replica holding it reports it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteState {
    pub since: String,
    pub last_activity: Option<String>,
}

/// Aborts the order listener of a connection when the hub forgets the connection.
pub struct Listener(tokio::task::AbortHandle);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Hub {
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Turns replica mode on: from now on orders for devices this replica does not hold go to
    /// the others, and revocations announced by any replica close connections here.
    pub async fn join_replicas(
        self: &Arc<Self>,
        cluster: Arc<Cluster>,
        stream_replicas: usize,
    ) -> anyhow::Result<()> {
        // Minute windows; two minutes of age keep the current and the previous one.
        let connects = cluster
            .bucket("connects", Duration::from_secs(120), stream_replicas)
            .await?;
        if self.limits.set(SharedLimits { connects }).is_err() {
            anyhow::bail!("the hub already runs in replica mode");
        }
        let hub = Arc::downgrade(self);
        cluster
            .on_revocation(move |serial| {
                if let Some(hub) = hub.upgrade() {
                    hub.close_revoked(serial);
                }
            })
            .await?;
        if self.cluster.set(cluster).is_err() {
            anyhow::bail!("the hub already runs in replica mode");
        }
        Ok(())
    }

    /// A new connection, recorded by [`Hub::connected`]: listen for its device's orders, then
    /// tell any other replica holding an older connection of it to close that one.
    pub(super) fn listen_for_orders(self: &Arc<Self>, device_id: &str, connection: u64) {
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        let Some(stamp) = self.stamp_of(device_id, connection) else {
            return;
        };
        let hub = Arc::downgrade(self);
        let device = device_id.to_string();
        let task = cluster.runtime().spawn(serve_orders(
            hub,
            cluster.clone(),
            device.clone(),
            connection,
            stamp,
        ));
        let listener = Arc::new(Listener(task.abort_handle()));
        let mut activity = super::lock(&self.activity);
        match activity.live.get_mut(&device) {
            Some(live) if live.outbound.connection_id() == connection => {
                live.orders = Some(listener)
            }
            // Gone already: dropping the listener stops the task.
            _ => {}
        }
    }

    /// Counts an accepted CONNECT of the device across replicas; `false` beyond
    /// [`SHARED_CONNECTS_PER_MINUTE`] in this minute. Without replica mode, or when NATS does
    /// not answer, the local limit alone applies (`true`).
    pub(super) async fn shared_connect_allowed(&self, device_id: &str) -> bool {
        let Some(limits) = self.limits.get() else {
            return true;
        };
        let minute = crate::time::now_unix() / 60;
        let counted = tokio::time::timeout(
            SHARED_COUNT_WAIT,
            limits.connects.increment(&format!("{device_id}\n{minute}")),
        )
        .await;
        match counted {
            Ok(Ok(count)) => count <= SHARED_CONNECTS_PER_MINUTE,
            Ok(Err(e)) => {
                tracing::warn!(device_id, "the shared connect count failed: {e}");
                true
            }
            Err(_) => {
                tracing::warn!(device_id, "the shared connect count did not answer in time");
                true
            }
        }
    }

    fn stamp_of(&self, device_id: &str, connection: u64) -> Option<Stamp> {
        let activity = super::lock(&self.activity);
        let live = activity.live.get(device_id)?;
        (live.outbound.connection_id() == connection).then(|| live.stamp.clone())
    }

    /// Closes the local connection `connection` of the device, if it is still the live one.
    fn close_local(&self, device_id: &str, connection: u64) {
        if let Some(outbound) = self.outbound(device_id)
            && outbound.connection_id() == connection
        {
            outbound.close();
        }
    }

    /// Asks the replica holding the device for the connection's state; `None` when no
    /// replica holds it (or none answered in time).
    pub(super) async fn remote_state(&self, device_id: &str) -> Option<RemoteState> {
        let cluster = self.cluster()?;
        let answer = cluster
            .ask(device_id, Order::State, Bytes::new(), STATE_WAIT)
            .await;
        match answer {
            Ok(Some(body)) => serde_json::from_slice(&body).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(device_id, "connection state from another replica: {e}");
                None
            }
        }
    }

    /// A method call for a device this replica does not hold: `None` when no replica holds it.
    pub(super) async fn remote_method(
        &self,
        device_id: &str,
        call: &MethodCall,
    ) -> Option<Result<MethodOutcome, crate::cluster::ClusterError>> {
        let cluster = self.cluster()?;
        let body = serde_json::to_vec(call).ok()?;
        // The holder waits for the device up to the call's timeout; allow for the hop.
        let wait = Duration::from_secs(call.response_timeout_in_seconds) + Duration::from_secs(2);
        match cluster
            .ask(device_id, Order::Method, body.into(), wait)
            .await
        {
            Ok(Some(answer)) => Some(serde_json::from_slice(&answer).map_err(|e| {
                crate::cluster::ClusterError::Nats(format!("a malformed method answer: {e}"))
            })),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Serves the orders for one connection until the connection is forgotten (the hub drops
/// the [`Listener`], which aborts this task) or the hub is gone.
async fn serve_orders(
    hub: Weak<Hub>,
    cluster: Arc<Cluster>,
    device_id: String,
    connection: u64,
    stamp: Stamp,
) {
    let mut orders = match cluster.listen(&device_id).await {
        Ok(orders) => orders,
        Err(e) => {
            tracing::warn!(device_id, "listening for the device's orders failed: {e}");
            return;
        }
    };
    let announce = match serde_json::to_vec(&stamp) {
        Ok(body) => Bytes::from(body),
        Err(_) => return,
    };
    cluster
        .tell(&device_id, Order::Takeover, announce.clone())
        .await;
    while let Some(message) = orders.next().await {
        let Some(hub) = hub.upgrade() else { return };
        let Some(order) = Order::of_subject(message.subject.as_str()) else {
            continue;
        };
        match order {
            Order::Takeover => {
                let Ok(other) = serde_json::from_slice::<Stamp>(&message.payload) else {
                    continue;
                };
                // Our own announcement, or one from this replica (the engine already took
                // over locally).
                if other.replica == stamp.replica {
                    continue;
                }
                if other > stamp {
                    tracing::info!(device_id, newer = %other.replica, "connection taken over by another replica");
                    hub.close_local(&device_id, connection);
                } else {
                    // An older connection elsewhere: remind it that this one is newer.
                    cluster
                        .tell(&device_id, Order::Takeover, announce.clone())
                        .await;
                }
            }
            Order::Close => {
                // Only connections older than the order (see `Hub::close_connection`).
                let issued = std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok());
                if issued.is_none_or(|issued| stamp.nanos <= issued) {
                    hub.close_local(&device_id, connection);
                }
            }
            Order::C2d => {
                let device_id = device_id.clone();
                tokio::spawn(async move { hub.deliver_c2d(&device_id).await });
            }
            Order::Desired => {
                if let Ok(patch) = serde_json::from_slice::<Value>(&message.payload) {
                    hub.notify_desired_local(&device_id, &patch);
                }
            }
            Order::Method => {
                let (Some(reply), Ok(call)) = (
                    message.reply,
                    serde_json::from_slice::<MethodCall>(&message.payload),
                ) else {
                    continue;
                };
                let (cluster, device_id) = (cluster.clone(), device_id.clone());
                tokio::spawn(async move {
                    let outcome = hub.call_local(&device_id, &call).await;
                    if let Ok(body) = serde_json::to_vec(&outcome) {
                        cluster.answer(reply, body.into()).await;
                    }
                });
            }
            Order::State => {
                let Some(reply) = message.reply else { continue };
                let state = hub.local_state(&device_id);
                if let Some(state) = state
                    && let Ok(body) = serde_json::to_vec(&state)
                {
                    cluster.answer(reply, body.into()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newer_stamp_wins_and_the_replica_name_breaks_ties() {
        let a = Stamp {
            nanos: 5,
            replica: "a".into(),
        };
        let b = Stamp {
            nanos: 5,
            replica: "b".into(),
        };
        let later = Stamp {
            nanos: 6,
            replica: "a".into(),
        };
        assert!(b > a);
        assert!(later > b);
    }

    #[test]
    fn method_outcomes_travel_as_tagged_json() {
        let text = serde_json::to_string(&MethodOutcome::Answered {
            status: 200,
            payload: serde_json::json!({"ok": true}),
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"outcome":"answered","status":200,"payload":{"ok":true}}"#
        );
        let back: MethodOutcome = serde_json::from_str(r#"{"outcome":"timedOut"}"#).unwrap();
        assert!(matches!(back, MethodOutcome::TimedOut));
    }
}
