//! The device MQTT endpoint (MQTT 3.1.1 over TLS, port 8883 by default).
//!
//! One listener serves every MQTT client; what a client may do is decided by an
//! [`Application`], chosen per CONNECT by the username's shape (the hub:
//! `{host}/{deviceId}/?api-version=…`; DPS: `{idScope}/registrations/{id}/api-version=…`).
//!
//! The engine (this module and its children) owns the protocol: TLS, the codec, keep-alive,
//! persistent sessions (CleanSession=0 subscriptions survive reconnects and restarts),
//! QoS 1 in both directions, takeover of a client id that connects twice, expiry of the
//! credentials, and reconnect rate limits. Applications own meaning: authentication, topic
//! ACLs, and what a PUBLISH does.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;

use crate::tls::PeerCertificates;

mod codec;
mod connection;
mod engine;
pub mod listener;
mod outbound;
mod sessions;
mod topic;
mod workers;

#[cfg(test)]
mod tests;

/// An inbound PUBLISH, as the application gets it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub dup: bool,
    /// When the engine read the packet. A connection's packets reach the application one at a
    /// time and in order, so the time since is how long this one waited behind earlier ones:
    /// an application that sheds load can answer a stale request at once.
    pub read_at: std::time::Instant,
}

/// A boxed future, so applications can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A CONNECT, with what the TLS layer saw. `Debug` never prints the password.
#[derive(Clone)]
pub struct ConnectRequest {
    pub client_id: String,
    pub username: Option<String>,
    /// The password as UTF-8 (SAS tokens are text); `None` when absent or not UTF-8.
    pub password: Option<String>,
    pub clean_session: bool,
    pub keep_alive_secs: u16,
    pub peer_certificates: Option<PeerCertificates>,
    pub remote: SocketAddr,
}

impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("clean_session", &self.clean_session)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// Why a CONNECT is refused: the CONNACK return code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 0x02
    IdentifierRejected,
    /// 0x03: transient; clients retry.
    ServerUnavailable,
    /// 0x04
    BadUserNameOrPassword,
    /// 0x05: what Azure sends for every credential problem; clients do not retry.
    NotAuthorized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QoS {
    AtMostOnce,
    AtLeastOnce,
}

/// An application's answer to a SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeVerdict {
    Grant(QoS),
    /// SUBACK 0x80 for this filter.
    Refuse,
    /// Close the connection.
    Disconnect,
}

/// An application's answer to an inbound PUBLISH.
pub enum PublishVerdict {
    /// Accepted: for QoS 1 the engine sends PUBACK now. Applications resolve their future only
    /// once the message is durable when durability is promised.
    Ack,
    /// Accepted and put in order (queued for storage, say), not yet durable: for QoS 1 the
    /// engine sends PUBACK once this resolves `true`; `false` closes the connection, as
    /// [`PublishVerdict::Disconnect`] does. Meanwhile the connection's next packets are handled,
    /// so several of its messages can wait at once (at most [`MAX_WAITING_ACKS`]); PUBACKs and
    /// the other replies still go out in the order the packets came. The future is polled only
    /// once every reply before it has gone out, so it should only wait (for a commit, say).
    AckWhen(BoxFuture<'static, bool>),
    /// Close the connection (MQTT 3.1.1 has no negative PUBACK).
    Disconnect,
}

impl std::fmt::Debug for PublishVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PublishVerdict::Ack => "Ack",
            PublishVerdict::AckWhen(_) => "AckWhen",
            PublishVerdict::Disconnect => "Disconnect",
        })
    }
}

/// Replies a connection may have waiting on [`PublishVerdict::AckWhen`] futures; beyond it the
/// engine stops taking its packets until the oldest is answered.
pub const MAX_WAITING_ACKS: usize = 32;

/// Why a connection ended, for the application's bookkeeping and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    ClientDisconnect,
    ConnectionLost,
    KeepAliveTimeout,
    CredentialsExpired,
    TakenOver,
    ClosedByApplication,
    ProtocolError(String),
    ServerShutdown,
}

/// What an application returns for a CONNECT it accepts.
pub struct Accepted {
    pub session: Box<dyn Session>,
    /// Persistent sessions and takeover are keyed by this (e.g. `hub/{deviceId}`), not by
    /// the raw client id, so two applications can never collide.
    pub session_key: String,
    /// Unix seconds at which the credentials expire; the engine disconnects then.
    pub expires_at: Option<u64>,
}

/// Decides what clients may do. Implemented by the hub (and DPS).
pub trait Application: Send + Sync + 'static {
    /// Authenticates a CONNECT. `outbound` reaches this connection for as long as it lives.
    fn connect(
        &self,
        request: ConnectRequest,
        outbound: Outbound,
    ) -> BoxFuture<'_, Result<Accepted, Refusal>>;
}

/// One accepted connection, as the application sees it.
pub trait Session: Send + Sync + 'static {
    /// Called once just before CONNACK is sent, with persistent subscriptions already
    /// restored; what it queues on the `Outbound` goes out after the CONNACK.
    fn ready(&self) {}
    /// Whether this filter may be subscribed (with the QoS to grant).
    fn subscribe(&self, filter: &str, requested: QoS) -> SubscribeVerdict;
    /// An inbound PUBLISH. For QoS 1 the PUBACK waits for the returned future (and, for
    /// [`PublishVerdict::AckWhen`], for the future in it). Calls come one at a time, in the
    /// order the client sent the packets.
    fn publish(&self, message: Inbound) -> BoxFuture<'_, PublishVerdict>;
    /// The connection ended. Called exactly once, after which `Outbound` sends fail.
    fn closed(&self, reason: CloseReason);
}

/// The connection has closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the MQTT connection is closed")]
pub struct Closed;

pub use outbound::Outbound;
