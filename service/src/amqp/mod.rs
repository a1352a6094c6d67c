//! The AMQP 1.0 listener (TLS, port 5671 by default): the back-end half of the Azure SDKs.
//!
//! TLS is ours (the same certificate and policy as HTTPS and MQTT); AMQP framing, sessions
//! and links are `fe2o3-amqp`'s acceptor. A connection may negotiate SASL (ANONYMOUS, or
//! uamqp's MSSBCBS, which says the same: a token follows on `$cbs`) or skip it (rhea, under
//! the Node SDKs, sends the plain AMQP header); either way it is anonymous until it puts a
//! token on `$cbs` ([`cbs`]). Each link is checked against the connection's grants when it
//! attaches and for every message. Addresses are matched by path: uamqp sends whole URLs
//! (`amqps://{host}/messages/devicebound`), rhea paths.
//!
//! Links served:
//! - `$cbs`, both directions: put-token requests and their answers;
//! - `/messages/devicebound` (the client sends): cloud-to-device messages ([`c2d`]), which
//!   need `ServiceConnect`;
//! - `/messages/servicebound/feedback` (the client receives): their delivery feedback
//!   ([`feedback`]), which needs `ServiceConnect`;
//! - `/devices/{id}/messages/events` (the device sends) and `/devices/{id}/messages/devicebound`
//!   (the device receives): devices' telemetry and C2D ([`device`]), which need
//!   `DeviceConnect` for that device's path;
//! - `$management`, both directions, and `/{entity}/ConsumerGroups/{group}/Partitions/{id}`
//!   (the client receives): the Event Hubs-compatible endpoint for telemetry ([`eventhubs`]),
//!   which needs `ServiceConnect` for the entity's path.
//!
//! Our `open`, `begin` and `attach` carry every field up to `properties`, and transfers go out
//! batchable (all eleven fields): pyamqp, under azure-eventhub, reads performatives by field
//! index and fails on the trailing fields AMQP lets a peer leave out.
//!
//! Any other address is attached and at once closed with `amqp:not-found`, so a client learns
//! why; a link without the right is closed with `amqp:unauthorized-access`.

pub mod c2d;
pub mod cbs;
pub mod device;
pub mod eventhubs;
pub mod feedback;
mod replay;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SaslAcceptor, SessionAcceptor, SupportedReceiverSettleModes,
};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};
use fe2o3_amqp_types::definitions::{ReceiverSettleMode, Role};
use fe2o3_amqp_types::messaging::TargetArchetype;
use fe2o3_amqp_types::messaging::{Body, Message};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::Value;
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use openssl::ssl::SslAcceptor;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use crate::auth::Rights;
use crate::hub::Hub;

/// How long a client has for TLS and its protocol header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message we take (C2D bodies are at most 64 KiB; properties come on top).
const MAX_MESSAGE_SIZE: u64 = 256 * 1024;
/// The idle timeout we announce in `open`, as IoT Hub (4 minutes): clients send a frame at
/// least that often. pyamqp (azure-eventhub) also needs the field present to read `open`.
const IDLE_TIMEOUT_MS: u32 = 240_000;
/// The highest link handle a session may use (so at most this many links plus one).
const MAX_LINKS_PER_SESSION: u32 = 255;
/// How long an answer (CBS, management) waits for the client's receiver link.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// What every connection shares.
struct Shared {
    tls: SslAcceptor,
    hub: Arc<Hub>,
    stop: Notify,
}

/// A running listener; dropping it does not stop it, [`AmqpListener::shutdown`] does.
#[derive(Clone)]
pub struct AmqpListener {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for AmqpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpListener")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl AmqpListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections (open ones end with the runtime).
    pub fn shutdown(&self) {
        // One accept loop waits on it; `notify_one` keeps the permit if it is not waiting now.
        self.shared.stop.notify_one();
    }
}

/// Binds `addr` and serves AMQP for `hub`.
pub async fn start(
    addr: SocketAddr,
    tls: SslAcceptor,
    hub: Arc<Hub>,
) -> std::io::Result<AmqpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        tls,
        hub,
        stop: Notify::new(),
    });
    tokio::spawn(accept_loop(listener, shared.clone()));
    tracing::info!(%local_addr, "AMQP listener started");
    Ok(AmqpListener { shared, local_addr })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.stop.notified() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(tcp, &shared).await {
                        tracing::info!(%peer, error = %e, "AMQP connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("AMQP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("AMQP listener stopped accepting");
}

/// The `properties` of our `open`, `begin` and `attach`. Sent always: pyamqp (azure-eventhub)
/// reads those performatives by field index, so the last field must be there.
fn product() -> fe2o3_amqp_types::definitions::Fields {
    let mut fields = fe2o3_amqp_types::definitions::Fields::new();
    fields.insert(Symbol::from("product"), Value::String("zerotouch".into()));
    fields.insert(
        Symbol::from("version"),
        Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    fields
}

/// The SASL mechanisms after which a client proves itself on `$cbs`: `ANONYMOUS` (rhea,
/// Python's pyamqp) and Microsoft's `MSSBCBS` (uamqp, under azure-iot-hub and the older
/// Event Hubs SDKs). Both carry no credential; anything else is refused.
#[derive(Debug, Clone)]
struct CbsFollows;

impl CbsFollows {
    const MECHANISMS: [&'static str; 2] = ["MSSBCBS", "ANONYMOUS"];
}

impl SaslAcceptor for CbsFollows {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(
            Self::MECHANISMS
                .iter()
                .map(|m| Symbol::from(*m))
                .collect::<Vec<_>>(),
        )
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = if Self::MECHANISMS.contains(&init.mechanism.as_str()) {
            SaslCode::Ok
        } else {
            SaslCode::Auth
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Sys,
            additional_data: None,
        })
    }
}

/// One connection: TLS, the protocol header, SASL or not, then its sessions.
async fn serve(tcp: TcpStream, shared: &Arc<Shared>) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let ssl = openssl::ssl::Ssl::new(shared.tls.context())?;
    let mut stream = tokio_openssl::SslStream::new(ssl, tcp)?;
    let mut header = [0u8; 8];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        Pin::new(&mut stream)
            .accept()
            .await
            .map_err(std::io::Error::other)?;
        stream.read_exact(&mut header).await.map(drop)
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!("no TLS handshake and protocol header within {HANDSHAKE_TIMEOUT:?}")
    })??;
    let peer = crate::tls::peer_certificates(stream.ssl());
    let stream = replay::Replay::new(header.to_vec(), stream);
    let mut connection = if header[..4] == *b"AMQP" && header[4] == 3 {
        ConnectionAcceptor::builder()
            .container_id("zerotouch")
            .idle_time_out(IDLE_TIMEOUT_MS)
            .properties(product())
            .sasl_acceptor(CbsFollows)
            .build()
            .accept(stream)
            .await?
    } else {
        // A plain AMQP header, or garbage, which the acceptor answers with its own header
        // and refuses.
        ConnectionAcceptor::builder()
            .container_id("zerotouch")
            .idle_time_out(IDLE_TIMEOUT_MS)
            .properties(product())
            .build()
            .accept(stream)
            .await?
    };
    let state = Arc::new(ConnectionState {
        hub: shared.hub.clone(),
        grants: cbs::Grants::default(),
        peer,
        replies: tokio::sync::Mutex::new(Default::default()),
        replies_ready: Notify::new(),
        twin_subscriptions: Default::default(),
        method_listeners: Default::default(),
        links: Default::default(),
    });
    // `handle-max` explicitly: left at its default it is sent as null, which pyamqp cannot
    // count links against.
    let sessions = SessionAcceptor::builder()
        .handle_max(MAX_LINKS_PER_SESSION)
        .properties(product())
        .build();
    loop {
        tokio::select! {
            accepted = sessions.accept(&mut connection) => match accepted {
                Ok(session) => {
                    tokio::spawn(serve_session(session, state.clone()));
                }
                Err(_) => break,
            },
            () = shared.stop.notified() => break,
        }
    }
    // What the connection's links left running: the links' own tasks (an idle C2D or partition
    // link would otherwise go on polling until its token expired), desired-property
    // forwarders, and reply channels.
    let links = std::mem::take(&mut *state.links.lock().unwrap_or_else(|p| p.into_inner()));
    for link in links {
        link.abort();
    }
    for (_, forwarder) in state.twin_subscriptions.lock().await.drain() {
        forwarder.abort();
    }
    for (_, calls) in state.method_listeners.lock().await.drain() {
        calls.abort();
    }
    state.replies.lock().await.clear();
    close(connection).await;
    Ok(())
}

async fn close(mut connection: ListenerConnectionHandle) {
    let _ = connection.close().await;
}

/// What the links of one connection share.
struct ConnectionState {
    hub: Arc<Hub>,
    grants: cbs::Grants,
    /// The TLS client certificate, if the client sent one (X.509 devices).
    peer: Option<crate::tls::PeerCertificates>,
    /// Where answers go, by node (`$cbs`, `$management`): the client's receiver link from
    /// it, once attached.
    replies:
        tokio::sync::Mutex<std::collections::HashMap<String, mpsc::Sender<Message<Body<Value>>>>>,
    replies_ready: Notify,
    /// The tasks serving this connection's links, aborted when it ends.
    links: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    /// Method-call senders of devices' method links, by device id.
    method_listeners:
        tokio::sync::Mutex<std::collections::HashMap<String, tokio::task::AbortHandle>>,
    /// Desired-property forwarders of devices' twin links, by device id.
    twin_subscriptions:
        tokio::sync::Mutex<std::collections::HashMap<String, tokio::task::AbortHandle>>,
}

impl ConnectionState {
    /// Whether a live grant holds `needed` for `path` now.
    fn holds(&self, needed: Rights, path: &str) -> bool {
        self.grants
            .holding(needed, crate::time::now_unix(), path)
            .is_some()
    }
}

fn address_of(attach: &Attach) -> Option<String> {
    // The client's sender names our receiving end in its target; its receiver names our
    // sending end in its source.
    match attach.role {
        Role::Sender => match attach.target.as_deref() {
            Some(TargetArchetype::Target(target)) => target.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        },
        Role::Receiver => attach.source.as_ref().and_then(|s| s.address.clone()),
    }
}

/// The device links, by their address `/devices/{id}/{suffix}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// `messages/events`: telemetry, sent by the device.
    Events,
    /// `messages/devicebound`: C2D, received by the device.
    DeviceBound,
    /// `twin`: twin requests one way, answers and desired patches the other.
    Twin,
    /// `methods/devicebound`: method calls one way, answers the other.
    Methods,
}

impl Link {
    const ALL: [(Link, &'static str); 4] = [
        (Link::Events, "/messages/events"),
        (Link::DeviceBound, "/messages/devicebound"),
        (Link::Twin, "/twin"),
        (Link::Methods, "/methods/devicebound"),
    ];
}

/// `/devices/{id}/…` (the leading slash optional, the id percent-decoded) → the link and the
/// device id.
pub fn link_of(path: &str) -> Option<(Link, String)> {
    let rest = path.trim_start_matches('/').strip_prefix("devices/")?;
    Link::ALL.iter().find_map(|(link, suffix)| {
        let id = rest.strip_suffix(suffix)?;
        if id.is_empty() || id.contains('/') {
            return None;
        }
        let id = percent_encoding::percent_decode_str(id)
            .decode_utf8()
            .ok()?;
        Some((*link, id.into_owned()))
    })
}

/// The node an address names: uamqp writes whole URLs (`amqps://host/messages/devicebound`),
/// rhea bare paths; the host of a URL is the one the client dialed, so only the path counts.
fn node_of(address: &str) -> &str {
    for scheme in ["amqps://", "amqp://"] {
        if let Some(rest) = address.strip_prefix(scheme) {
            return rest.find('/').map_or("", |i| &rest[i..]);
        }
    }
    address
}

async fn serve_session(mut session: ListenerSessionHandle, state: Arc<ConnectionState>) {
    // Deliveries are settled in one step, as IoT Hub does: uamqp asks for receiver settle
    // mode `second` but waits for a settled disposition, which mode `second` would hold back
    // until it settled first.
    let links = LinkAcceptor::builder()
        .max_message_size(MAX_MESSAGE_SIZE)
        .properties(product())
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    while let Some(attach) = session.next_incoming_attach().await {
        let address = address_of(&attach).unwrap_or_default();
        let address = node_of(&address).to_string();
        let selector = match attach.role {
            Role::Receiver => {
                eventhubs::selector_of(attach.source.as_ref().and_then(|s| s.filter.as_ref()))
            }
            Role::Sender => None,
        };
        let endpoint = match links.accept_incoming_attach(attach, &mut session).await {
            Ok(endpoint) => endpoint,
            Err(e) => {
                tracing::info!(address, error = ?e, "AMQP: a link could not attach");
                continue;
            }
        };
        let link_state = state.clone();
        let link = tokio::spawn(async move {
            match endpoint {
                LinkEndpoint::Receiver(receiver) => {
                    serve_incoming(receiver, &address, link_state).await
                }
                LinkEndpoint::Sender(sender) => {
                    serve_outgoing(sender, &address, selector.as_deref(), link_state).await
                }
            }
        });
        let mut links = state.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|l| !l.is_finished());
        links.push(link.abort_handle());
    }
    let _ = session.end().await;
}

fn not_found(address: &str) -> fe2o3_amqp_types::definitions::Error {
    c2d::error(
        ErrorCondition::AmqpError(AmqpError::NotFound),
        format!("no node {address:?} here"),
    )
}

/// How a device link at `address` for `device_id` may attach (`"sas"` or `"x509"`), or `None`:
/// a live `DeviceConnect` grant covering it (and the device registered and enabled), or the
/// connection's client certificate authenticating as that device, which then becomes a grant
/// until it expires.
async fn device_allowed(
    state: &ConnectionState,
    address: &str,
    device_id: &str,
) -> Option<&'static str> {
    let now = crate::time::now_unix();
    if let Some(grant) = state.grants.holding(Rights::DEVICE_CONNECT, now, address) {
        let method = if grant.audience.starts_with(X509_AUDIENCE) {
            "x509"
        } else {
            "sas"
        };
        return device::enabled(&state.hub, device_id)
            .await
            .then_some(method);
    }
    let peer = state.peer.as_ref()?;
    match device::authenticate_x509(&state.hub, device_id, peer).await {
        Ok(expires) => {
            tracing::info!(device_id, "AMQP: device certificate accepted");
            state.grants.add(cbs::Grant {
                audience: format!("{X509_AUDIENCE}{device_id}"),
                scope: format!("/devices/{device_id}"),
                caller: crate::auth::Caller {
                    principal: format!("device:{device_id}"),
                    rights: Rights::DEVICE_CONNECT,
                },
                expires,
            });
            Some("x509")
        }
        Err(failure) => {
            state.hub.metrics.auth_failure(failure.reason());
            tracing::info!(
                device_id,
                reason = failure.reason(),
                "AMQP: device certificate refused"
            );
            None
        }
    }
}

/// The audience of the grant a client certificate gives (no CBS audience starts so).
const X509_AUDIENCE: &str = "x509:";

fn unauthorized(needed: Rights) -> fe2o3_amqp_types::definitions::Error {
    c2d::error(
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
        format!("put a token with {needed} on $cbs first"),
    )
}

/// A link on which the client sends.
async fn serve_incoming(mut receiver: Receiver, address: &str, state: Arc<ConnectionState>) {
    if let Some((link, device_id)) = link_of(address) {
        let Some(auth_method) = device_allowed(&state, address, &device_id).await else {
            let _ = receiver
                .close_with_error(unauthorized(Rights::DEVICE_CONNECT))
                .await;
            return;
        };
        let hub = state.hub.clone();
        match link {
            Link::Events => {
                device::serve_events(receiver, hub, device_id, auth_method, || {
                    state.holds(Rights::DEVICE_CONNECT, address)
                })
                .await
            }
            Link::Methods => device::serve_method_answers(receiver, hub, device_id).await,
            Link::Twin => serve_twin_requests(receiver, &state, device_id).await,
            Link::DeviceBound => {
                let _ = receiver.close_with_error(not_found(address)).await;
            }
        }
        return;
    }
    match address {
        cbs if cbs.trim_start_matches('/') == cbs::NODE => {
            while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
                let _ = receiver.accept(&delivery).await;
                let request = delivery.into_message();
                let answer = cbs::handle(&state.hub, &state.grants, &request).await;
                send_reply(&state, cbs::NODE, cbs::reply(&request, &answer)).await;
            }
        }
        management if management.trim_start_matches('/') == eventhubs::MANAGEMENT => {
            // Python's client signs for the event hub, Node's for its management node.
            let entity = format!("/{}/{}", eventhubs::ENTITY, eventhubs::MANAGEMENT);
            let needed = Rights::SERVICE_CONNECT;
            while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
                let _ = receiver.accept(&delivery).await;
                let request = delivery.into_message();
                let (status, description, body) = if state.holds(needed, &entity) {
                    eventhubs::manage(&state.hub, &request).await
                } else {
                    let why = format!("put a token with {needed} for {entity} on $cbs first");
                    (401, why, Value::Null)
                };
                let reply = cbs::response(&request, status, &description, body);
                send_reply(&state, eventhubs::MANAGEMENT, reply).await;
            }
        }
        c2d::ADDRESS => {
            let needed = Rights::SERVICE_CONNECT;
            if !state.holds(needed, address) {
                let _ = receiver.close_with_error(unauthorized(needed)).await;
                return;
            }
            while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
                let outcome = if !state.holds(needed, address) {
                    Err(unauthorized(needed))
                } else {
                    match c2d::outgoing(delivery.message().clone()) {
                        Err(e) => Err(e),
                        Ok((device, message)) => state
                            .hub
                            .send_c2d(&device, message)
                            .await
                            .map_err(|e| c2d::hub_error(&e)),
                    }
                };
                let disposed = match outcome {
                    Ok(_) => receiver.accept(&delivery).await,
                    Err(e) => {
                        tracing::info!(error = %e, "AMQP: a C2D message was refused");
                        receiver.reject(&delivery, e).await
                    }
                };
                if disposed.is_err() {
                    break;
                }
            }
        }
        other => {
            let _ = receiver.close_with_error(not_found(other)).await;
        }
    }
}

/// A device's twin requests: GET and reported patches answered as over MQTT, and the
/// desired-patch subscription, whose patches go to the twin receiver link as they come.
async fn serve_twin_requests(
    mut receiver: Receiver,
    state: &Arc<ConnectionState>,
    device_id: String,
) {
    let key = twin_replies(&device_id);
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let _ = receiver.accept(&delivery).await;
        let request = delivery.into_message();
        let answer = match device::twin_operation(&request) {
            Some(device::TwinOperation::Subscribe) => {
                let mut patches = state.hub.listen_desired(&device_id);
                let (forward_state, forward_key) = (state.clone(), key.clone());
                let forward = tokio::spawn(async move {
                    while let Some(patch) = patches.recv().await {
                        let delta = device::desired_delta(&patch);
                        send_reply(&forward_state, &forward_key, delta).await;
                    }
                });
                let previous = state
                    .twin_subscriptions
                    .lock()
                    .await
                    .insert(device_id.clone(), forward.abort_handle());
                if let Some(previous) = previous {
                    previous.abort();
                }
                device::twin_answer(&request, 200, None, None)
            }
            Some(device::TwinOperation::Unsubscribe) => {
                let previous = state.twin_subscriptions.lock().await.remove(&device_id);
                if let Some(previous) = previous {
                    previous.abort();
                }
                device::twin_answer(&request, 200, None, None)
            }
            _ => device::twin_request(&state.hub, &device_id, &request).await,
        };
        send_reply(state, &key, answer).await;
    }
}

/// The reply channel of a device's twin receiver link.
fn twin_replies(device_id: &str) -> String {
    format!("twin:{device_id}")
}

/// A link on which the client receives; `selector` is its source's filter, if any.
async fn serve_outgoing(
    sender: Sender,
    address: &str,
    selector: Option<&str>,
    state: Arc<ConnectionState>,
) {
    if let Some((link, device_id)) = link_of(address) {
        if device_allowed(&state, address, &device_id).await.is_none() {
            let _ = sender
                .close_with_error(unauthorized(Rights::DEVICE_CONNECT))
                .await;
            return;
        }
        let hub = state.hub.clone();
        match link {
            Link::DeviceBound => {
                device::serve_c2d(sender, hub, device_id, || {
                    state.holds(Rights::DEVICE_CONNECT, address)
                })
                .await
            }
            Link::Methods => {
                // Ended with the connection (the task waits on calls, not on the link).
                let calls =
                    tokio::spawn(device::serve_method_calls(sender, hub, device_id.clone()));
                let previous = state
                    .method_listeners
                    .lock()
                    .await
                    .insert(device_id, calls.abort_handle());
                if let Some(previous) = previous {
                    previous.abort();
                }
            }
            Link::Twin => serve_replies(sender, &state, twin_replies(&device_id)).await,
            Link::Events => {
                let _ = sender.close_with_error(not_found(address)).await;
            }
        }
        return;
    }
    match address {
        partition if eventhubs::partition_of(partition).is_some() => {
            let needed = Rights::SERVICE_CONNECT;
            if !state.holds(needed, address) {
                let _ = sender.close_with_error(unauthorized(needed)).await;
                return;
            }
            let (_group, id) = eventhubs::partition_of(partition).unwrap_or_default();
            if !eventhubs::PARTITIONS.contains(&id.as_str()) {
                let _ = sender.close_with_error(not_found(address)).await;
                return;
            }
            let start = match eventhubs::start_of(selector) {
                Ok(start) => start,
                Err(e) => {
                    let invalid = ErrorCondition::AmqpError(AmqpError::InvalidField);
                    let _ = sender.close_with_error(c2d::error(invalid, e)).await;
                    return;
                }
            };
            let hub = state.hub.clone();
            eventhubs::serve_partition(sender, hub, start, || state.holds(needed, address)).await;
        }
        feedback if feedback::is_feedback(feedback) => {
            let needed = Rights::SERVICE_CONNECT;
            if !state.holds(needed, address) {
                let _ = sender.close_with_error(unauthorized(needed)).await;
                return;
            }
            let hub = state.hub.clone();
            feedback::serve(sender, hub, || state.holds(needed, address)).await;
        }
        cbs if cbs.trim_start_matches('/') == cbs::NODE => {
            serve_replies(sender, &state, cbs::NODE.to_string()).await
        }
        management if management.trim_start_matches('/') == eventhubs::MANAGEMENT => {
            serve_replies(sender, &state, eventhubs::MANAGEMENT.to_string()).await
        }
        other => {
            let _ = sender.close_with_error(not_found(other)).await;
        }
    }
}

/// Sends the answers [`send_reply`] routes to `key` (a node, or a device's twin) on this link,
/// until the link or the connection ends.
async fn serve_replies(mut sender: Sender, state: &ConnectionState, key: String) {
    let (tx, mut rx) = mpsc::channel(16);
    state.replies.lock().await.insert(key, tx);
    state.replies_ready.notify_waiters();
    while let Some(reply) = rx.recv().await {
        if send(&mut sender, reply).await.is_err() {
            break;
        }
    }
}

/// Sends a message and waits for its outcome. Through `send_batchable`, whose transfer carries
/// all eleven fields: pyamqp (azure-eventhub) finds the payload by field count, and a transfer
/// without its trailing `batchable` puts it at the wrong index.
pub(crate) async fn send(
    sender: &mut Sender,
    message: Message<Body<Value>>,
) -> Result<fe2o3_amqp_types::messaging::Outcome, fe2o3_amqp::link::SendError> {
    sender.send_batchable(message).await?.await
}

/// Sends an answer on the client's receiver link from `node`, waiting for it to attach.
async fn send_reply(state: &ConnectionState, node: &str, reply: Message<Body<Value>>) {
    let deadline = tokio::time::Instant::now() + REPLY_WAIT;
    loop {
        let ready = state.replies_ready.notified();
        if let Some(tx) = state.replies.lock().await.get(node).cloned() {
            let _ = tx.send(reply).await;
            return;
        }
        if tokio::time::timeout_at(deadline, ready).await.is_err() {
            tracing::info!(node, "AMQP: an answer had no receiver link to go to");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_name_their_link_and_device() {
        assert_eq!(
            link_of("/devices/d-1/messages/events"),
            Some((Link::Events, "d-1".into()))
        );
        assert_eq!(
            link_of("devices/d%201/messages/events"),
            Some((Link::Events, "d 1".into()))
        );
        assert_eq!(
            link_of("/devices/d-1/messages/devicebound"),
            Some((Link::DeviceBound, "d-1".into()))
        );
        assert_eq!(
            link_of("/devices/d-1/twin"),
            Some((Link::Twin, "d-1".into()))
        );
        assert_eq!(
            link_of("/devices/d-1/methods/devicebound"),
            Some((Link::Methods, "d-1".into()))
        );
        assert_eq!(link_of("/devices//messages/events"), None);
        assert_eq!(link_of("/devices/a/b/messages/events"), None);
        assert_eq!(link_of("/devices/d-1/other"), None);
    }

    #[test]
    fn a_node_is_the_path_of_a_url_or_the_address_itself() {
        assert_eq!(
            node_of("amqps://h:5671/messages/devicebound"),
            "/messages/devicebound"
        );
        assert_eq!(node_of("amqp://h/$cbs"), "/$cbs");
        assert_eq!(node_of("$cbs"), "$cbs");
        assert_eq!(node_of("/messages/devicebound"), "/messages/devicebound");
        assert_eq!(node_of("amqps://h"), "");
    }
}
