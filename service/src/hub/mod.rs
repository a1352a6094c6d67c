//! The hub: a device identity registry with twins, the device-facing MQTT application, direct
//! methods, cloud-to-device messages and durable telemetry, compatible with Azure IoT Hub
//! (hub-protocol.md).
//!
//! [`Hub`] holds the state shared by the MQTT side (`hub::mqtt`) and the service API
//! (`http::hub`): storage, the live connections by device id, pending method calls and the C2D
//! delivery locks. Identities, twins, C2D messages and MQTT sessions are documents in the
//! store; telemetry goes to the append-only [`Telemetry`] log.

pub mod auth;
pub mod c2d;
pub mod device;
pub mod error;
pub mod join;
pub mod methods;
pub mod mqtt;
pub mod replicas;
mod reported;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use zerotouch_twin::document::Twin;

use crate::db::{Change, Collection, DocumentStore, StoreError, Write};
use crate::mqtt::{Outbound, QoS};
use crate::telemetry::Telemetry;
use crate::telemetry::stream::{EventKind, HubEvent};
use device::{ConnectionView, Device, NEVER};
use error::{HubError, HubErrorCode};

/// Topic filter a device subscribes to for desired-property notifications.
pub const DESIRED_FILTER_TOPIC: &str = "$iothub/twin/PATCH/properties/desired/";

/// A live device connection.
#[derive(Clone)]
struct Live {
    outbound: Outbound,
    since: String,
    /// Its place in the order of takeovers across replicas.
    stamp: replicas::Stamp,
    /// In replica mode, the task that serves the device's orders from other replicas.
    orders: Option<Arc<replicas::Listener>>,
}

#[derive(Default)]
struct Activity {
    live: HashMap<String, Live>,
    state_updated: HashMap<String, String>,
    last_activity: HashMap<String, String>,
}

pub struct Hub {
    store: Arc<dyn DocumentStore>,
    /// Names devices and services use for this hub (its `HostName`s).
    pub hostnames: Vec<String>,
    /// The `HostName` written into connection strings.
    pub hostname: String,
    pub telemetry: Telemetry,
    activity: Mutex<Activity>,
    pub methods: methods::PendingMethods,
    pub c2d: c2d::Deliveries,
    pub metrics: HubMetrics,
    /// CA certificates (PEM) that certificateAuthority devices may chain to, besides verified
    /// uploads in this store: this service's own CA, or, on a joined hub, what the provisioning
    /// service sends with each heartbeat.
    trust_bundle: std::sync::RwLock<String>,
    /// Live X.509 connections by certificate serial, closed when the certificate is revoked.
    pub certificates: crate::pki::live::LiveCertificates,
    /// Device twin requests (MQTT) being served; see [`Hub::twin_slot`].
    twin_slots: tokio::sync::Semaphore,
    /// Stores reported patches in batches.
    reported: reported::ReportedWriter,
    /// Replica mode: the other replicas, through NATS (`hub::replicas`).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Replica mode: limits counted together with the other replicas.
    limits: std::sync::OnceLock<replicas::SharedLimits>,
    /// Desired-property patches for devices on transports without an `Outbound` (AMQP), by
    /// device id; see [`Hub::listen_desired`].
    desired_listeners: Mutex<HashMap<String, Vec<tokio::sync::mpsc::UnboundedSender<Value>>>>,
}

/// Device twin requests served at once. Beyond this, a request waits at most
/// [`TWIN_QUEUE_WAIT`] for a turn and is otherwise answered 429: IoT Hub throttles twin
/// operations the same way, and the SDKs treat 429 as "retry later".
pub const TWIN_CONCURRENCY: usize = 64;
/// How long a device twin request may wait, from the moment it was read, before it is answered
/// 429 instead of being served.
pub const TWIN_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct HubMetrics {
    pub messages_in: std::sync::atomic::AtomicU64,
    pub bytes_in: std::sync::atomic::AtomicU64,
    pub twin_operations: std::sync::atomic::AtomicU64,
    /// Device twin requests answered 429 (see [`Hub::twin_slot`]).
    pub twin_throttled: std::sync::atomic::AtomicU64,
    pub method_calls: std::sync::atomic::AtomicU64,
    pub auth_failures: Mutex<HashMap<&'static str, u64>>,
}

impl HubMetrics {
    pub fn auth_failure(&self, reason: &'static str) {
        if let Ok(mut map) = self.auth_failures.lock() {
            *map.entry(reason).or_default() += 1;
        }
    }

    pub fn count(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What [`Hub::store_device`] stored.
struct StoredDevice {
    device: Device,
    /// Bare (no quotes).
    etag: String,
    created: bool,
    /// The new twin's root `version` when it was created with tags and desired properties.
    seeded_twin_version: Option<u64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain maps; the data is
    // still usable, and refusing service forever would be worse.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new(
        store: Arc<dyn DocumentStore>,
        hostnames: Vec<String>,
        hostname: String,
        telemetry: Telemetry,
        trust_bundle: String,
    ) -> Hub {
        Hub {
            trust_bundle: std::sync::RwLock::new(trust_bundle),
            certificates: Default::default(),
            reported: reported::ReportedWriter::start(Arc::clone(&store)),
            store,
            hostnames,
            hostname,
            telemetry,
            activity: Mutex::new(Activity::default()),
            methods: methods::PendingMethods::default(),
            c2d: c2d::Deliveries::default(),
            metrics: HubMetrics::default(),
            twin_slots: tokio::sync::Semaphore::new(TWIN_CONCURRENCY),
            cluster: std::sync::OnceLock::new(),
            limits: std::sync::OnceLock::new(),
            desired_listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Desired-property patches of `device_id` from now on, for a connection that is not an
    /// MQTT one (AMQP twin links). Dropping the receiver ends the subscription (pruned at the
    /// next patch). Local to this process: in replica mode a patch made through another replica
    /// reaches it only if that replica holds the device's MQTT connection.
    pub fn listen_desired(&self, device_id: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.desired_listeners)
            .entry(device_id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    fn notify_desired_listeners(&self, device_id: &str, patch: &Value) {
        let mut listeners = lock(&self.desired_listeners);
        if let Some(senders) = listeners.get_mut(device_id) {
            senders.retain(|tx| tx.send(patch.clone()).is_ok());
            if senders.is_empty() {
                listeners.remove(device_id);
            }
        }
    }

    /// A turn to serve one device twin request read at `read_at`, or `None` when the hub is
    /// saturated: the request already waited [`TWIN_QUEUE_WAIT`] behind earlier packets of its
    /// connection, or no turn came free before that. Overload then costs devices a quick 429,
    /// never seconds of queueing behind the store.
    pub async fn twin_slot(
        &self,
        read_at: std::time::Instant,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let deadline = tokio::time::Instant::from_std(read_at + TWIN_QUEUE_WAIT);
        match tokio::time::timeout_at(deadline, self.twin_slots.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) | Err(_) => {
                HubMetrics::count(&self.metrics.twin_throttled, 1);
                None
            }
        }
    }

    /// The CA bundle trusted for certificateAuthority devices (see the field).
    pub fn trust_bundle(&self) -> String {
        self.trust_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub fn set_trust_bundle(&self, pem: String) {
        match self.trust_bundle.write() {
            Ok(mut bundle) => *bundle = pem,
            Err(poisoned) => *poisoned.into_inner() = pem,
        }
    }

    pub fn store(&self) -> &Arc<dyn DocumentStore> {
        &self.store
    }

    /// Whether `host` (optionally with a port) names this hub.
    pub fn is_own_host(&self, host: &str) -> bool {
        let bare = crate::auth::strip_port(host);
        self.hostnames.iter().any(|h| {
            h.eq_ignore_ascii_case(bare) || h.eq_ignore_ascii_case(bare.trim_matches(['[', ']']))
        })
    }

    // ----- connections --------------------------------------------------------------------

    /// Records a device's live connection (the MQTT engine has already taken over any older
    /// one of the same device on this replica; in replica mode, an older one elsewhere is
    /// told to close).
    pub fn connected(self: &Arc<Self>, device_id: &str, outbound: Outbound) {
        let connection = outbound.connection_id();
        self.record_connection(device_id, outbound);
        self.listen_for_orders(device_id, connection);
        self.connection_event(device_id, "deviceConnected");
    }

    /// Publishes a hub event (replica mode; see `telemetry::stream::HubEvent`). `body` is built
    /// only when events are published: single-process mode does no work for them.
    fn event(
        &self,
        kind: EventKind,
        op_type: &'static str,
        device_id: &str,
        body: impl FnOnce() -> Value,
    ) {
        if !self.telemetry.publishes_events() {
            return;
        }
        self.telemetry.event(HubEvent {
            kind,
            op_type,
            hub_name: self.hostname.clone(),
            device_id: device_id.to_string(),
            body: body(),
        });
    }

    /// A device's reported patch, as a twin change event.
    pub fn reported_event(&self, device_id: &str, version: u64, patch: &Value) {
        self.event(
            EventKind::Twin,
            "updateTwin",
            device_id,
            || json!({"version": version, "properties": {"reported": patch}}),
        );
    }

    fn connection_event(&self, device_id: &str, op_type: &'static str) {
        self.event(EventKind::Connection, op_type, device_id, || {
            let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
            json!({"sequenceNumber": format!("{nanos:032x}")})
        });
    }

    fn record_connection(&self, device_id: &str, outbound: Outbound) {
        let now = crate::time::now_rfc3339();
        let replica = self.cluster().map_or("", |c| c.replica());
        let stamp = replicas::Stamp::now(replica);
        let mut activity = lock(&self.activity);
        activity
            .state_updated
            .insert(device_id.to_string(), now.clone());
        activity
            .last_activity
            .insert(device_id.to_string(), now.clone());
        activity.live.insert(
            device_id.to_string(),
            Live {
                outbound,
                since: now,
                stamp,
                orders: None,
            },
        );
    }

    /// Forgets a connection, unless a newer one of the same device has replaced it.
    pub fn disconnected(&self, device_id: &str, connection_id: u64) {
        let mut activity = lock(&self.activity);
        let current = activity
            .live
            .get(device_id)
            .is_some_and(|l| l.outbound.connection_id() == connection_id);
        if current {
            activity.live.remove(device_id);
            activity
                .state_updated
                .insert(device_id.to_string(), crate::time::now_rfc3339());
            drop(activity);
            self.connection_event(device_id, "deviceDisconnected");
        }
    }

    pub fn touch(&self, device_id: &str) {
        lock(&self.activity)
            .last_activity
            .insert(device_id.to_string(), crate::time::now_rfc3339());
    }

    pub fn outbound(&self, device_id: &str) -> Option<Outbound> {
        lock(&self.activity)
            .live
            .get(device_id)
            .map(|l| l.outbound.clone())
            .filter(|o| !o.is_closed())
    }

    /// Closes every live connection that authenticated with the revoked certificate `serial`
    /// (hex), on every replica; `Pki` calls this for each certificate it revokes.
    pub fn certificate_revoked(&self, serial: &str) {
        self.close_revoked(serial);
        if let Some(cluster) = self.cluster() {
            cluster.announce_revocation(serial);
        }
    }

    /// The connections of this replica that authenticated with `serial`.
    fn close_revoked(&self, serial: &str) {
        let closed = self.certificates.close(serial);
        if closed > 0 {
            tracing::info!(
                serial,
                closed,
                "closed connections of a revoked certificate"
            );
        }
    }

    pub fn connected_count(&self) -> usize {
        lock(&self.activity).live.len()
    }

    /// Closes the device's connection, wherever it is (new credentials, disabled, deleted).
    fn close_connection(&self, device_id: &str) {
        if let Some(outbound) = self.outbound(device_id) {
            outbound.close();
        }
        if let Some(cluster) = self.cluster() {
            // Stamped: a connection that opens after the order (the device back with new
            // credentials) must not be closed by it when it arrives.
            let now = replicas::Stamp::now(cluster.replica()).nanos;
            let order = crate::cluster::Order::Close;
            cluster.tell_soon(device_id, order, now.to_string().into());
        }
    }

    /// The state of a connection this replica holds, for another replica's registry.
    fn local_state(&self, device_id: &str) -> Option<replicas::RemoteState> {
        let activity = lock(&self.activity);
        let live = activity.live.get(device_id)?;
        Some(replicas::RemoteState {
            since: live.since.clone(),
            last_activity: activity.last_activity.get(device_id).cloned(),
        })
    }

    async fn connection_view(&self, device_id: &str) -> ConnectionView {
        let c2d_pending = c2d::pending_count(&self.store, device_id)
            .await
            .unwrap_or(0);
        if self.outbound(device_id).is_none()
            && let Some(remote) = self.remote_state(device_id).await
        {
            let activity = lock(&self.activity);
            return ConnectionView {
                connected: true,
                state_updated_time: remote.since,
                last_activity_time: remote
                    .last_activity
                    .or_else(|| activity.last_activity.get(device_id).cloned())
                    .unwrap_or_else(|| NEVER.to_string()),
                c2d_pending,
            };
        }
        let activity = lock(&self.activity);
        let live = activity.live.get(device_id);
        ConnectionView {
            connected: live.is_some_and(|l| !l.outbound.is_closed()),
            state_updated_time: live
                .map(|l| l.since.clone())
                .or_else(|| activity.state_updated.get(device_id).cloned())
                .unwrap_or_else(|| NEVER.to_string()),
            last_activity_time: activity
                .last_activity
                .get(device_id)
                .cloned()
                .unwrap_or_else(|| NEVER.to_string()),
            c2d_pending,
        }
    }

    // ----- registry -------------------------------------------------------------------------

    pub async fn device(&self, device_id: &str) -> Result<Option<(Device, String)>, HubError> {
        let id = device_id.to_string();
        let doc =
            crate::db::blocking(&self.store, move |s| s.get(Collection::Devices, &id)).await?;
        doc.map(|d| {
            let device: Device = serde_json::from_value(d.body).map_err(HubError::internal)?;
            Ok((device, bare_etag(&d.etag)))
        })
        .transpose()
    }

    pub async fn require_device(&self, device_id: &str) -> Result<(Device, String), HubError> {
        self.device(device_id).await?.ok_or_else(|| {
            HubError::new(
                HubErrorCode::DeviceNotFound,
                format!("device {device_id} is not registered"),
            )
        })
    }

    /// PUT /devices/{id}: create (no If-Match) or replace (If-Match).
    pub async fn put_device(
        &self,
        device_id: &str,
        body: Value,
        if_match: Option<String>,
    ) -> Result<Value, HubError> {
        let stored = self.store_device(device_id, body, if_match, None).await?;
        Ok(self.device_written(device_id, &stored).await)
    }

    /// [`Hub::put_device`] for a caller that does not read the answer (the provisioning
    /// service): the connection state in the view costs a store read (and in replica mode a
    /// bucket read), so it is not built unless an event needs it. When it creates the device
    /// and `twin` is given, the new twin is stored with `twin`'s tags and desired properties
    /// at once, as [`Hub::replace_twin_quietly`] would set them afterwards, without reading
    /// back what was just written; the answer says whether it was (`false`: the device
    /// existed, and the caller replaces the twin itself).
    pub async fn put_device_quietly(
        &self,
        device_id: &str,
        body: Value,
        if_match: Option<String>,
        twin: Option<&Value>,
    ) -> Result<bool, HubError> {
        let stored = self.store_device(device_id, body, if_match, twin).await?;
        if stored.created && self.telemetry.publishes_events() {
            self.device_written(device_id, &stored).await;
            if let (Some(twin), Some(version)) = (twin, stored.seeded_twin_version) {
                self.event(EventKind::Twin, "replaceTwin", device_id, || {
                    json!({"version": version, "properties": twin.get("properties"),
                        "tags": twin.get("tags")})
                });
            }
        }
        Ok(stored.seeded_twin_version.is_some())
    }

    /// The view of a device just written; a created one is announced as an event.
    async fn device_written(&self, device_id: &str, stored: &StoredDevice) -> Value {
        let view = stored
            .device
            .view(&stored.etag, &self.connection_view(device_id).await);
        if stored.created {
            let op = "createDeviceIdentity";
            self.event(EventKind::Lifecycle, op, device_id, || view.clone());
        }
        view
    }

    /// Stores the identity (and, when created, its new twin, with `seed`'s tags and desired
    /// properties if given).
    async fn store_device(
        &self,
        device_id: &str,
        body: Value,
        if_match: Option<String>,
        seed: Option<&Value>,
    ) -> Result<StoredDevice, HubError> {
        let previous = match &if_match {
            None => None,
            Some(_) => self.device(device_id).await?.map(|(d, _)| d),
        };
        let device = Device::from_request(
            device_id,
            body,
            previous.as_ref(),
            &crate::time::now_rfc3339(),
        )?;
        let value = serde_json::to_value(&device).map_err(HubError::internal)?;
        let write = match if_match {
            None => Write::Create,
            Some(etag) => Write::IfMatch(etag),
        };
        let id = device_id.to_string();
        let created = matches!(write, Write::Create);
        // The new twin is made (and the seed checked) before anything is stored, so a seed the
        // twin refuses leaves no device behind.
        let twin = if created {
            let now = crate::time::now_rfc3339();
            let mut twin = Twin::new(None, &now).map_err(HubError::internal)?;
            if let Some(seed) = seed {
                twin.replace_service(seed, &now)
                    .map_err(|e| HubError::new(HubErrorCode::ArgumentInvalid, e.to_string()))?;
            }
            Some(twin)
        } else {
            None
        };
        let doc = crate::db::blocking(&self.store, move |s| {
            s.put(Collection::Devices, &id, None, &value, write)
        })
        .await?;
        let seeded_twin_version = twin.as_ref().filter(|_| seed.is_some()).map(Twin::version);
        if let Some(twin) = twin {
            // Stored now, so its timestamps are those of the device's creation.
            let body = twin.to_value();
            let id = device_id.to_string();
            crate::db::blocking(&self.store, move |s| {
                s.put(Collection::Twins, &id, None, &body, Write::Upsert)
                    .map(drop)
            })
            .await?;
        }
        if previous.is_some_and(|p| p.credentials_changed(&device)) {
            self.close_connection(device_id);
        }
        Ok(StoredDevice {
            device,
            etag: bare_etag(&doc.etag),
            created,
            seeded_twin_version,
        })
    }

    pub async fn device_view(&self, device_id: &str) -> Result<Value, HubError> {
        let (device, etag) = self.require_device(device_id).await?;
        Ok(device.view(&etag, &self.connection_view(device_id).await))
    }

    /// DELETE /devices/{id}: the identity, its twin, pending C2D and MQTT session go.
    pub async fn delete_device(
        &self,
        device_id: &str,
        if_match: Option<String>,
    ) -> Result<(), HubError> {
        let id = device_id.to_string();
        crate::db::blocking(&self.store, move |s| {
            s.delete(Collection::Devices, &id, if_match.as_deref())?;
            for collection in [Collection::Twins, Collection::MqttSessions] {
                let key = if collection == Collection::MqttSessions {
                    mqtt::session_key(&id)
                } else {
                    id.clone()
                };
                match s.delete(collection, &key, None) {
                    Ok(_) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            c2d::purge(s, &id)
        })
        .await?;
        self.close_connection(device_id);
        let op = "deleteDeviceIdentity";
        self.event(
            EventKind::Lifecycle,
            op,
            device_id,
            || json!({"deviceId": device_id}),
        );
        Ok(())
    }

    pub async fn list_devices(&self, top: usize) -> Result<Vec<Value>, HubError> {
        let page = crate::db::blocking(&self.store, move |s| {
            s.list(Collection::Devices, None, top, None)
        })
        .await?;
        let mut out = Vec::with_capacity(page.items.len());
        for doc in page.items {
            let device: Device = serde_json::from_value(doc.body).map_err(HubError::internal)?;
            let view = self.connection_view(&device.device_id).await;
            out.push(device.view(&bare_etag(&doc.etag), &view));
        }
        Ok(out)
    }

    // ----- twins ----------------------------------------------------------------------------

    /// The twin and the store etag it was read with (`None`: not stored yet).
    async fn load_twin(&self, device_id: &str) -> Result<(Twin, Option<String>), HubError> {
        let id = device_id.to_string();
        let doc = crate::db::blocking(&self.store, move |s| s.get(Collection::Twins, &id)).await?;
        match doc {
            Some(doc) => {
                let twin = Twin::from_value(&doc.body).map_err(HubError::internal)?;
                Ok((twin, Some(doc.etag)))
            }
            None => {
                let twin =
                    Twin::new(None, &crate::time::now_rfc3339()).map_err(HubError::internal)?;
                Ok((twin, None))
            }
        }
    }

    pub async fn twin(&self, device_id: &str) -> Result<Twin, HubError> {
        Ok(self.load_twin(device_id).await?.0)
    }

    /// A device's reported-properties patch (a JSON object), merged and stored (in a batch
    /// with other devices' patches, `hub::reported`); the new reported version. Published as
    /// a twin change event in replica mode. The one way MQTT and AMQP devices report.
    pub async fn patch_reported(&self, device_id: &str, patch: Value) -> Result<u64, HubError> {
        let now = crate::time::now_rfc3339();
        // Kept for the twin change event (replica mode only).
        let reported = self.telemetry.publishes_events().then(|| patch.clone());
        let version = self.reported.patch(device_id, patch, now).await?;
        if let Some(patch) = &reported {
            self.reported_event(device_id, version, patch);
        }
        Ok(version)
    }

    /// Read-modify-write of a twin (`db::DocumentStore::update`): `change` sees the stored
    /// twin (a new one if none is stored) and runs again if a concurrent writer got there
    /// first.
    pub async fn update_twin<R, F>(
        &self,
        device_id: &str,
        mut change: F,
    ) -> Result<(Twin, R), HubError>
    where
        F: FnMut(&mut Twin) -> Result<R, HubError> + Send + 'static,
        R: Send + 'static,
    {
        let id = device_id.to_string();
        let updated = crate::db::blocking(&self.store, move |s| {
            Ok(s.update::<_, HubError>(Collection::Twins, &id, |doc| {
                let mut twin = match doc {
                    Some(doc) => Twin::from_value(&doc.body).map_err(HubError::internal)?,
                    None => {
                        Twin::new(None, &crate::time::now_rfc3339()).map_err(HubError::internal)?
                    }
                };
                let result = change(&mut twin)?;
                Ok(Change::put(twin.to_value(), (twin, result)))
            }))
        })
        .await??;
        HubMetrics::count(&self.metrics.twin_operations, 1);
        Ok(updated.result)
    }

    /// GET /twins/{id}: the twin merged with its identity's fields (hub-protocol §3.1).
    pub async fn twin_view(&self, device_id: &str) -> Result<Value, HubError> {
        let (device, device_etag) = self.require_device(device_id).await?;
        let twin = self.twin(device_id).await?;
        Ok(self.twin_service_view(&device, &device_etag, &twin).await)
    }

    pub async fn twin_service_view(
        &self,
        device: &Device,
        device_etag: &str,
        twin: &Twin,
    ) -> Value {
        let connection = self.connection_view(&device.device_id).await;
        let mut view = twin.service_view();
        let identity = json!({
            "deviceId": device.device_id,
            "moduleId": Value::Null,
            "deviceEtag": device_etag,
            "status": device.status.as_str(),
            "statusReason": device.status_reason,
            "statusUpdateTime": device.status_updated_time,
            "connectionState": connection.state(),
            "lastActivityTime": connection.last_activity_time,
            "cloudToDeviceMessageCount": connection.c2d_pending,
            "authenticationType": device.authentication_type.as_str(),
            "x509Thumbprint": {
                "primaryThumbprint": device.primary_thumbprint,
                "secondaryThumbprint": device.secondary_thumbprint,
            },
            "modelId": "",
            "capabilities": {"iotEdge": device.iot_edge},
        });
        if let (Some(view), Value::Object(identity)) = (view.as_object_mut(), identity) {
            view.extend(identity);
        }
        view
    }

    /// Service PATCH (`replace == false`) or PUT of a twin, guarded by the twin etag.
    pub async fn write_twin(
        &self,
        device_id: &str,
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<Value, HubError> {
        let (device, device_etag, twin) =
            self.store_twin(device_id, body, if_match, replace).await?;
        Ok(self.twin_service_view(&device, &device_etag, &twin).await)
    }

    /// Replaces the tags and desired properties, answering nothing (the provisioning
    /// service): [`Hub::write_twin`] without the view's connection state.
    pub async fn replace_twin_quietly(
        &self,
        device_id: &str,
        body: &Value,
    ) -> Result<(), HubError> {
        self.store_twin(device_id, body, None, true).await.map(drop)
    }

    async fn store_twin(
        &self,
        device_id: &str,
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<(Device, String, Twin), HubError> {
        let (device, device_etag) = self.require_device(device_id).await?;
        let (properties, tags) = (body.get("properties").cloned(), body.get("tags").cloned());
        let (body, if_match) = (body.clone(), if_match.map(String::from));
        let (twin, notification) = self
            .update_twin(device_id, move |twin| {
                if let Some(expected) = &if_match
                    && !twin.etag_matches(expected)
                {
                    return Err(HubError::new(
                        HubErrorCode::PreconditionFailed,
                        "the twin etag in If-Match does not match",
                    ));
                }
                let now = crate::time::now_rfc3339();
                let result = if replace {
                    twin.replace_service(&body, &now)
                } else {
                    twin.patch_service(&body, &now)
                };
                result.map_err(|e| HubError::new(HubErrorCode::ArgumentInvalid, e.to_string()))
            })
            .await?;
        if let Some(patch) = notification {
            self.notify_desired(device_id, &patch);
        }
        let op = if replace { "replaceTwin" } else { "updateTwin" };
        self.event(
            EventKind::Twin,
            op,
            device_id,
            || json!({"version": twin.version(), "properties": properties, "tags": tags}),
        );
        Ok((device, device_etag, twin))
    }

    /// Pushes a desired-properties patch to the device if it is connected (to this replica or
    /// another) and subscribed. Offline devices catch up with a twin GET (hub-protocol §2.4).
    pub fn notify_desired(&self, device_id: &str, patch: &Value) {
        self.notify_desired_listeners(device_id, patch);
        if self.outbound(device_id).is_some() {
            self.notify_desired_local(device_id, patch);
        } else if let Some(cluster) = self.cluster() {
            let order = crate::cluster::Order::Desired;
            cluster.tell_soon(device_id, order, patch.to_string().into());
        }
    }

    /// The same for a connection of this replica.
    fn notify_desired_local(&self, device_id: &str, patch: &Value) {
        let Some(outbound) = self.outbound(device_id) else {
            return;
        };
        let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
        let topic = format!("{DESIRED_FILTER_TOPIC}?$version={version}");
        if outbound.is_subscribed(&topic) {
            let _ = outbound.send(topic, patch.to_string().into(), QoS::AtMostOnce);
        }
    }
}

/// `"abc"` → `abc`: Azure shows etags unquoted in bodies; `If-Match` comparisons normalise.
pub fn bare_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Now on tokio's (paused) clock, as a standard `Instant`.
    fn now() -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    /// Tokio's clock is paused: a wait shows as the time the runtime skipped ahead.
    #[tokio::test(start_paused = true)]
    async fn a_twin_request_waits_for_a_turn_only_until_it_is_stale() {
        let fixture = crate::dps::testing::Fixture::new();
        let hub = &fixture.hub;
        let mut held = Vec::new();
        for _ in 0..TWIN_CONCURRENCY {
            held.push(hub.twin_slot(now()).await.expect("a free turn"));
        }

        // Fresh: waits the rest of its allowance for a turn, then gives up.
        let start = tokio::time::Instant::now();
        assert!(hub.twin_slot(now()).await.is_none());
        assert_eq!(start.elapsed(), TWIN_QUEUE_WAIT);
        // Stale (it waited behind earlier packets of its connection): refused at once.
        let start = tokio::time::Instant::now();
        let stale = now() - 4 * TWIN_QUEUE_WAIT;
        assert!(hub.twin_slot(stale).await.is_none());
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);
        assert_eq!(
            hub.metrics
                .twin_throttled
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // A free turn serves even a stale request: the hub is not saturated.
        held.pop();
        assert!(hub.twin_slot(stale).await.is_some());
    }
}
