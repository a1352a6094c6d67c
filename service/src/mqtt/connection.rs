//! One MQTT connection, from the accepted TCP stream to `Session::closed`.
//!
//! Phases: TLS handshake → CONNECT → `Application::connect` → (accepted) rate limit, takeover,
//! session restore, `Session::ready`, CONNACK → the live loop → clean-up.
//!
//! The live loop runs four parts concurrently inside the connection's one task:
//! - the **reader** decodes packets, answers PINGREQ, hands PUBACKs to the writer and queues
//!   PUBLISH/SUBSCRIBE/UNSUBSCRIBE for the worker; it enforces the keep-alive;
//! - the **worker** calls the application for those, one at a time and in order, so PUBACKs
//!   and SUBACKs go out in the order the client sent the packets. A slow application delays
//!   later PUBLISHes of the same connection but never PINGRESPs or outbound PUBACK handling,
//!   so an application may await an outbound QoS 1 publish inside `Session::publish`. An
//!   application that has put a message in order and only waits for it to be durable answers
//!   `PublishVerdict::AckWhen`: the worker goes on with the next packets while up to
//!   `MAX_WAITING_ACKS` replies wait, and sends them in packet order (telemetry: several
//!   messages of one device in one group commit, their PUBACKs in one socket write);
//! - the **writer** owns the socket's write side: replies, queued outbound messages, the QoS 1
//!   in-flight window and retransmission;
//! - timers for credential expiry, plus close requests and listener shutdown.
//!
//! When the client goes away (DISCONNECT, EOF), packets already read still reach the
//! application before `Session::closed`, so telemetry sent just before DISCONNECT is not lost.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::future::Either;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::Instrument;

use super::codec::{self, ClientPacket, DecodeError, ServerPacket};
use super::engine::{Engine, MqttLimits};
use super::outbound::{Message, Outbound, Shared};
use super::sessions;
use super::{
    Accepted, BoxFuture, CloseReason, ConnectRequest, Inbound, MAX_WAITING_ACKS, PublishVerdict,
    QoS, Refusal, Session, SubscribeVerdict, topic,
};

type Tls = tokio_rustls::server::TlsStream<TcpStream>;
type ReadSide = ReadHalf<Tls>;
type WriteSide = WriteHalf<Tls>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Application::connect` may take before the client gets CONNACK 0x03.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a takeover waits for the previous connection to finish.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long packets read before the end of a connection may take to reach the application.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A single socket write that takes longer marks the connection broken.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// TLS close_notify + FIN.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Packets read but not yet handled by the worker (beyond this the reader stops reading).
const WORK_QUEUE: usize = 32;
/// Replies waiting for the writer.
const CONTROL_QUEUE: usize = 64;
/// The writer batches packets into one socket write up to this size.
const WRITE_BATCH: usize = 64 * 1024;
/// After a write the writer keeps its buffer for the next one up to this capacity.
const KEPT_WRITE_BUFFER: usize = 4 * 1024;

/// Serves one accepted TCP connection until it ends.
pub(crate) async fn serve(engine: Arc<Engine>, tcp: TcpStream, remote: SocketAddr) {
    let (shared, commands) = Shared::new(engine.limits.outbound_queue);
    let span = tracing::info_span!(
        "mqtt",
        connection_id = shared.id,
        %remote,
        client_id = tracing::field::Empty
    );
    run(engine, tcp, remote, shared, commands)
        .instrument(span)
        .await;
}

async fn run(
    engine: Arc<Engine>,
    tcp: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Box<Message>>,
) {
    let established = tokio::select! {
        established = establish(&engine, tcp, remote, &shared) => established,
        () = engine.shutdown_signal() => None,
    };
    match established {
        Some(established) => session(&engine, established, shared, commands).await,
        None => {
            shared.mark_closed();
            shared.mark_finished();
        }
    }
}

struct Established {
    reader: FrameReader<ReadSide>,
    writer: WriteSide,
    connect: codec::Connect,
    accepted: Accepted,
}

/// TLS, CONNECT and the application's verdict. `None` when the connection ended (refusals have
/// been answered and the stream closed).
async fn establish(
    engine: &Engine,
    tcp: TcpStream,
    remote: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<Established> {
    // Boxed: the handshake's state (about 1.3 KB) is freed once it is done instead of sizing
    // every connection's task.
    let accept = Box::pin(engine.acceptor.accept(tcp));
    let tls = match timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return None;
        }
    };
    let peer_certificates = crate::tls::rustls_peer_certificates(tls.get_ref().1);
    let (read, mut writer) = tokio::io::split(tls);
    let mut reader = FrameReader::new(read, engine.limits.max_packet_bytes);

    let connect = match timeout(engine.limits.connect_timeout, reader.next()).await {
        Ok(Ok(Some(ClientPacket::Connect(connect)))) => connect,
        Ok(Ok(Some(other))) => {
            tracing::debug!(packet = ?other, "first packet is not CONNECT; closing");
            return None;
        }
        Ok(Ok(None)) => {
            tracing::debug!("closed before CONNECT");
            return None;
        }
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedProtocol { name, level }))) => {
            tracing::info!(protocol = %name, level, "unsupported protocol version; CONNACK 1");
            refuse(&mut writer, 1).await;
            close_tls(&mut writer).await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!("bad first packet, closing: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!("no CONNECT in time; closing");
            return None;
        }
    };
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    tracing::debug!(packet = ?connect, "received CONNECT");
    if connect.client_id.is_empty() && !connect.clean_session {
        // MQTT 3.1.1 §3.1.3.1: a zero-length client id needs CleanSession=1.
        tracing::info!("empty client id with CleanSession=0; CONNACK 2");
        refuse(&mut writer, 2).await;
        close_tls(&mut writer).await;
        return None;
    }
    if connect.has_will {
        tracing::debug!("the CONNECT carries a Will; wills are not published");
    }

    let request = ConnectRequest {
        client_id: connect.client_id.clone(),
        username: connect.username.clone(),
        password: connect.password.clone(),
        clean_session: connect.clean_session,
        keep_alive_secs: connect.keep_alive,
        peer_certificates,
        remote,
    };
    let outbound = Outbound {
        shared: shared.clone(),
    };
    let verdict = timeout(APP_CONNECT_TIMEOUT, engine.app.connect(request, outbound)).await;
    let accepted = match verdict {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(refusal)) => {
            let code = refusal_code(refusal);
            tracing::info!(code, "CONNECT refused: {refusal:?}");
            refuse(&mut writer, code).await;
            close_tls(&mut writer).await;
            return None;
        }
        Err(_) => {
            tracing::warn!("the application did not answer CONNECT in time; CONNACK 3");
            refuse(&mut writer, 3).await;
            close_tls(&mut writer).await;
            return None;
        }
    };
    Some(Established {
        reader,
        writer,
        connect,
        accepted,
    })
}

fn refusal_code(refusal: Refusal) -> u8 {
    match refusal {
        Refusal::IdentifierRejected => 2,
        Refusal::ServerUnavailable => 3,
        Refusal::BadUserNameOrPassword => 4,
        Refusal::NotAuthorized => 5,
    }
}

/// Writes a refusing CONNACK (the caller closes).
async fn refuse(writer: &mut WriteSide, code: u8) {
    let packet = ServerPacket::ConnAck {
        session_present: false,
        code,
    };
    if let Err(e) = timeout(CLOSE_TIMEOUT, write_packet(writer, &packet)).await {
        tracing::debug!("sending CONNACK {code} timed out: {e}");
    }
}

/// Sends TLS close_notify and FIN. Call once per stream.
async fn close_tls(writer: &mut WriteSide) {
    let _ = timeout(CLOSE_TIMEOUT, writer.shutdown()).await;
}

async fn write_packet(writer: &mut WriteSide, packet: &ServerPacket) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    codec::encode_server(packet, &mut buf).map_err(std::io::Error::other)?;
    writer.write_all(&buf).await?;
    writer.flush().await
}

/// An accepted connection, from the application's `Ok` to `Session::closed`.
async fn session(
    engine: &Engine,
    mut established: Established,
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<Box<Message>>,
) {
    // Fields are borrowed, not moved into locals: the task would hold them twice.
    let Established {
        reader,
        writer,
        connect,
        accepted,
    } = &mut established;
    let live = Live {
        engine,
        shared: &shared,
        session: accepted.session.as_ref(),
        key: &accepted.session_key,
        connect,
        expires_at: accepted.expires_at,
    };

    // From here on the application holds a session: `closed` is called exactly once, below.
    let reason = tokio::select! {
        reason = live.run(reader, writer, &mut commands) => reason,
        reason = shared.close_requested() => reason,
        () = engine.shutdown_signal() => CloseReason::ServerShutdown,
    };

    shared.mark_closed();
    // Queued messages are dropped, which fails their publishers with `Closed`.
    commands.close();
    while commands.try_recv().is_ok() {}
    close_tls(writer).await;
    // A session write may still be running in the blocking pool; let it land before a
    // takeover (which waits for `finished`) reads the session.
    drop(shared.persist.lock().await);
    engine.registry.remove(&accepted.session_key, shared.id);
    tracing::info!(reason = ?reason, "MQTT connection closed");
    accepted.session.closed(reason);
    // Taken over while it was taking over: the newest connection waits for this one, and
    // through it for the one this one displaced.
    shared.displaced_finished(TAKEOVER_TIMEOUT).await;
    shared.mark_finished();
}

struct Live<'a> {
    engine: &'a Engine,
    shared: &'a Arc<Shared>,
    session: &'a dyn Session,
    key: &'a str,
    connect: &'a codec::Connect,
    expires_at: Option<u64>,
}

impl Live<'_> {
    async fn run(
        &self,
        reader: &mut FrameReader<ReadSide>,
        writer: &mut WriteSide,
        commands: &mut mpsc::Receiver<Box<Message>>,
    ) -> CloseReason {
        let engine = self.engine;
        if !engine.rate.attempt(self.key) {
            tracing::info!(session_key = self.key, "reconnecting too often; CONNACK 3");
            refuse(writer, 3).await;
            return CloseReason::ProtocolError("reconnect rate limit exceeded".into());
        }

        if let Some(previous) = engine.registry.insert(self.key, self.shared.clone()) {
            tracing::info!(
                previous_connection_id = previous.id,
                "the session is connected elsewhere; taking it over"
            );
            previous.request_close(CloseReason::TakenOver);
            self.shared.displaced(previous);
            self.shared.displaced_finished(TAKEOVER_TIMEOUT).await;
        }

        let store = engine.store.clone();
        let restored = if self.connect.clean_session {
            if let Err(e) = sessions::delete(store, self.key).await {
                tracing::warn!("deleting the stored MQTT session failed: {e}");
            }
            None
        } else {
            match sessions::load(store, self.key, engine.limits.max_subscriptions).await {
                Ok(restored) => restored,
                Err(e) => {
                    tracing::error!("loading the stored MQTT session failed: {e}; CONNACK 3");
                    refuse(writer, 3).await;
                    return CloseReason::ProtocolError("the session store is unavailable".into());
                }
            }
        };
        let session_present = restored.is_some();
        self.shared
            .subscriptions()
            .extend(restored.unwrap_or_default());

        // Ready before CONNACK: once a client holds its CONNACK, the application knows the
        // connection (a service may call a method on the device at once, from any thread).
        // What the application queues now goes out after the CONNACK.
        self.session.ready();
        let connack = ServerPacket::ConnAck {
            session_present,
            code: 0,
        };
        if let Err(e) = write_packet(writer, &connack).await {
            tracing::debug!("writing CONNACK failed: {e}");
            return CloseReason::ConnectionLost;
        }
        tracing::info!(
            session_present,
            clean_session = self.connect.clean_session,
            keep_alive = self.connect.keep_alive,
            expires_at = self.expires_at,
            "MQTT client connected"
        );

        // Items are boxed: a channel allocates its first 32-slot block up front, so unboxed
        // slots (64–80 bytes) cost every idle connection about 6 KB (docs/performance.md).
        let (control_tx, mut control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (work_tx, mut work_rx) = mpsc::channel(WORK_QUEUE);
        let keep_alive = (self.connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(self.connect.keep_alive) * 1500));
        let worker = Worker {
            session: self.session,
            shared: self.shared,
            store: &engine.store,
            key: self.key,
            persistent: !self.connect.clean_session,
            max_subscriptions: engine.limits.max_subscriptions,
        };
        // Pinned here and lent to `inbound`: passed by value they would be stored twice in
        // this connection's task (an argument and a pinned local), about 1 KB per connection.
        let read = std::pin::pin!(read_loop(reader, control_tx.clone(), work_tx, keep_alive));
        let work = std::pin::pin!(worker.run(&mut work_rx, control_tx));
        tokio::select! {
            reason = inbound(read, work) => reason,
            reason = write_loop(writer, &mut control_rx, commands, &engine.limits) => reason,
            () = expiry(self.expires_at) => CloseReason::CredentialsExpired,
        }
    }
}

/// Sleeps until the credentials expire (forever without an expiry).
async fn expiry(expires_at: Option<u64>) {
    let Some(at) = expires_at else {
        return std::future::pending().await;
    };
    let at = UNIX_EPOCH + Duration::from_secs(at);
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(left).await;
}

/// Runs the reader and the worker; when the reader ends, lets the worker finish what was read.
async fn inbound(
    mut read: Pin<&mut impl Future<Output = CloseReason>>,
    mut work: Pin<&mut impl Future<Output = Option<CloseReason>>>,
) -> CloseReason {
    tokio::select! {
        reason = &mut read => {
            // The reader has dropped its end of the work queue: the worker stops once empty.
            if timeout(DRAIN_TIMEOUT, &mut work).await.is_err() {
                tracing::warn!("the application did not handle the last packets in time");
            }
            reason
        }
        reason = &mut work => reason.unwrap_or(CloseReason::ConnectionLost),
    }
}

/// For the writer.
enum Control {
    Packet(ServerPacket),
    /// The client's PUBACK for an outbound QoS 1 message.
    Acked(u16),
}

/// For the worker.
enum Work {
    /// With the moment it was read.
    Publish(codec::Publish, std::time::Instant),
    Subscribe(codec::Subscribe),
    Unsubscribe(codec::Unsubscribe),
}

/// Runs `future` until `deadline` (no deadline: to completion). `None` when the deadline passed.
/// Not an `async fn`: that would hold `future` twice (argument and awaited local), and this
/// sits in every connection's task.
fn until<F: Future>(
    deadline: Option<Instant>,
    future: F,
) -> impl Future<Output = Option<F::Output>> {
    match deadline {
        Some(deadline) => Either::Left(timeout_at(deadline, future).map(Result::ok)),
        None => Either::Right(future.map(Some)),
    }
}

async fn read_loop(
    reader: &mut FrameReader<ReadSide>,
    control: mpsc::Sender<Box<Control>>,
    work: mpsc::Sender<Box<Work>>,
    keep_alive: Option<Duration>,
) -> CloseReason {
    let mut last_packet = Instant::now();
    loop {
        // MQTT 3.1.1 §3.1.2.10: no packet for 1.5 × keep-alive ends the connection. The deadline
        // also bounds waiting for a busy worker, so a wedged connection cannot live forever.
        let deadline = keep_alive.map(|k| last_packet + k);
        let packet = match until(deadline, reader.next()).await {
            None => return CloseReason::KeepAliveTimeout,
            Some(Ok(Some(packet))) => packet,
            Some(Ok(None)) => return CloseReason::ConnectionLost,
            Some(Err(ReadError::Io(e))) => {
                tracing::debug!("read failed: {e}");
                return CloseReason::ConnectionLost;
            }
            Some(Err(ReadError::Decode(e))) => {
                tracing::info!("closing on a bad packet: {e}");
                return CloseReason::ProtocolError(e.to_string());
            }
        };
        last_packet = Instant::now();
        let deadline = keep_alive.map(|k| last_packet + k);
        tracing::debug!(packet = ?packet, "received");
        let sent = match packet {
            ClientPacket::PingReq => until(
                deadline,
                control.send(Box::new(Control::Packet(ServerPacket::PingResp))),
            )
            .await
            .map(|r| r.is_ok()),
            ClientPacket::PubAck(pkid) => {
                until(deadline, control.send(Box::new(Control::Acked(pkid))))
                    .await
                    .map(|r| r.is_ok())
            }
            ClientPacket::Publish(publish) => {
                if publish.qos > 1 {
                    tracing::info!("QoS 2 PUBLISH; closing");
                    return CloseReason::ProtocolError("QoS 2 is not supported".into());
                }
                if !topic::valid_topic(&publish.topic) {
                    tracing::info!(topic = %publish.topic, "PUBLISH to an invalid topic name; closing");
                    return CloseReason::ProtocolError("invalid topic name".into());
                }
                let read_at = std::time::Instant::now();
                until(
                    deadline,
                    work.send(Box::new(Work::Publish(publish, read_at))),
                )
                .await
                .map(|r| r.is_ok())
            }
            ClientPacket::Subscribe(subscribe) => {
                until(deadline, work.send(Box::new(Work::Subscribe(subscribe))))
                    .await
                    .map(|r| r.is_ok())
            }
            ClientPacket::Unsubscribe(unsubscribe) => until(
                deadline,
                work.send(Box::new(Work::Unsubscribe(unsubscribe))),
            )
            .await
            .map(|r| r.is_ok()),
            ClientPacket::Disconnect => return CloseReason::ClientDisconnect,
            ClientPacket::Connect(_) => {
                return CloseReason::ProtocolError("a second CONNECT".into());
            }
            ClientPacket::Unexpected(name) => {
                return CloseReason::ProtocolError(format!("unexpected {name}"));
            }
        };
        match sent {
            None => return CloseReason::KeepAliveTimeout,
            Some(false) => return CloseReason::ConnectionLost,
            Some(true) => {}
        }
    }
}

struct Worker<'a> {
    session: &'a dyn Session,
    shared: &'a Arc<Shared>,
    store: &'a Arc<dyn crate::db::DocumentStore>,
    key: &'a str,
    persistent: bool,
    max_subscriptions: usize,
}

/// A reply of the worker: a packet (or none, for QoS 0), or close the connection.
enum Reply {
    Packet(Option<ServerPacket>),
    Close,
}

/// Replies waiting on [`PublishVerdict::AckWhen`] futures, in packet order. Only the oldest is
/// polled: a later one cannot go out before it anyway. (A `VecDeque` costs an idle connection
/// nothing; a `FuturesOrdered` would allocate.)
type Waiting = std::collections::VecDeque<BoxFuture<'static, Reply>>;

/// Resolves with the oldest waiting reply and removes it. Cancel-safe: it removes it only when
/// it resolves.
async fn oldest(waiting: &mut Waiting) -> Reply {
    let reply = std::future::poll_fn(|cx| match waiting.front_mut() {
        Some(future) => future.as_mut().poll(cx),
        None => std::task::Poll::Pending,
    })
    .await;
    waiting.pop_front();
    reply
}

impl Worker<'_> {
    /// Handles queued packets in order. `Some(reason)` when the application asked to close;
    /// `None` once the queue is closed, empty and every waiting reply is out.
    async fn run(
        &self,
        work: &mut mpsc::Receiver<Box<Work>>,
        control: mpsc::Sender<Box<Control>>,
    ) -> Option<CloseReason> {
        let mut waiting = Waiting::new();
        loop {
            let next = tokio::select! {
                biased;
                reply = oldest(&mut waiting), if !waiting.is_empty() => Either::Left(reply),
                item = work.recv(), if waiting.len() < MAX_WAITING_ACKS => Either::Right(item),
            };
            let reply = match next {
                Either::Left(reply) => reply,
                Either::Right(Some(item)) => match self.handle(*item).await {
                    Either::Left(reply) if waiting.is_empty() => reply,
                    Either::Left(reply) => {
                        waiting.push_back(Box::pin(std::future::ready(reply)));
                        continue;
                    }
                    Either::Right(later) => {
                        waiting.push_back(later);
                        continue;
                    }
                },
                // The reader has gone: what was read is handled; send what is still waiting.
                Either::Right(None) if waiting.is_empty() => return None,
                Either::Right(None) => oldest(&mut waiting).await,
            };
            match reply {
                Reply::Packet(None) => {}
                Reply::Packet(Some(packet)) => {
                    if control
                        .send(Box::new(Control::Packet(packet)))
                        .await
                        .is_err()
                    {
                        return None;
                    }
                }
                Reply::Close => return Some(CloseReason::ClosedByApplication),
            }
        }
    }

    /// One packet: its reply now, or a future of it ([`PublishVerdict::AckWhen`]).
    async fn handle(&self, item: Work) -> Either<Reply, BoxFuture<'static, Reply>> {
        let reply = match item {
            Work::Publish(publish, read_at) => {
                let (qos, pkid) = (publish.qos, publish.pkid);
                let verdict = self
                    .session
                    .publish(Inbound {
                        topic: publish.topic,
                        payload: publish.payload,
                        qos: if qos == 0 {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        },
                        dup: publish.dup,
                        read_at,
                    })
                    .await;
                let ack = (qos == 1).then_some(ServerPacket::PubAck(pkid));
                match verdict {
                    PublishVerdict::Ack => Reply::Packet(ack),
                    PublishVerdict::AckWhen(durable) => {
                        return Either::Right(Box::pin(durable.map(move |durable| {
                            if durable {
                                Reply::Packet(ack)
                            } else {
                                tracing::info!("the application failed a PUBLISH; closing");
                                Reply::Close
                            }
                        })));
                    }
                    PublishVerdict::Disconnect => {
                        tracing::info!("the application refused a PUBLISH; closing");
                        Reply::Close
                    }
                }
            }
            Work::Subscribe(subscribe) => match self.subscribe(subscribe).await {
                Some(suback) => Reply::Packet(Some(suback)),
                None => {
                    tracing::info!("the application refused a SUBSCRIBE; closing");
                    Reply::Close
                }
            },
            Work::Unsubscribe(unsubscribe) => {
                Reply::Packet(Some(self.unsubscribe(unsubscribe).await))
            }
        };
        Either::Left(reply)
    }

    /// The SUBACK, or `None` to close the connection.
    async fn subscribe(&self, subscribe: codec::Subscribe) -> Option<ServerPacket> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut changed = false;
        for (filter, requested) in subscribe.filters {
            if !topic::valid_filter(&filter) {
                tracing::debug!(filter, "invalid topic filter; SUBACK 0x80");
                codes.push(0x80);
                continue;
            }
            // QoS 2 is granted as QoS 1.
            let requested = if requested == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let full = {
                let subscriptions = self.shared.subscriptions();
                !subscriptions.contains_key(&filter)
                    && subscriptions.len() >= self.max_subscriptions
            };
            if full {
                tracing::info!(filter, "too many subscriptions; SUBACK 0x80");
                codes.push(0x80);
                continue;
            }
            // No lock held while the application runs: it may call `is_subscribed`.
            match self.session.subscribe(&filter, requested) {
                SubscribeVerdict::Grant(granted) => {
                    // Never more than was asked for (MQTT 3.1.1 §3.9.3).
                    let granted = match (granted, requested) {
                        (QoS::AtLeastOnce, QoS::AtLeastOnce) => QoS::AtLeastOnce,
                        _ => QoS::AtMostOnce,
                    };
                    tracing::debug!(filter, ?granted, "subscribed");
                    codes.push(sessions::qos_number(granted));
                    self.shared.subscriptions().insert(filter, granted);
                    changed = true;
                }
                SubscribeVerdict::Refuse => {
                    tracing::debug!(filter, "subscription refused; SUBACK 0x80");
                    codes.push(0x80);
                }
                SubscribeVerdict::Disconnect => return None,
            }
        }
        if changed {
            self.persist().await;
        }
        Some(ServerPacket::SubAck {
            pkid: subscribe.pkid,
            codes,
        })
    }

    async fn unsubscribe(&self, unsubscribe: codec::Unsubscribe) -> ServerPacket {
        let changed = {
            let mut subscriptions = self.shared.subscriptions();
            let before = subscriptions.len();
            for filter in &unsubscribe.filters {
                subscriptions.remove(filter);
            }
            subscriptions.len() != before
        };
        if changed {
            self.persist().await;
        }
        ServerPacket::UnsubAck(unsubscribe.pkid)
    }

    /// Stores the subscription set (CleanSession=0 only). Failures are logged: the
    /// subscriptions still hold for this connection.
    async fn persist(&self) {
        if !self.persistent {
            return;
        }
        let guard = self.shared.persist.clone().lock_owned().await;
        let snapshot: Vec<(String, QoS)> = self
            .shared
            .subscriptions()
            .iter()
            .map(|(filter, qos)| (filter.clone(), *qos))
            .collect();
        if let Err(e) = sessions::save(self.store.clone(), self.key, snapshot, guard).await {
            tracing::error!("storing the MQTT session failed: {e}");
        }
    }
}

/// An outbound QoS 1 message waiting for its PUBACK.
struct Inflight {
    publish: codec::Publish,
    sent_at: Instant,
    acked: Option<oneshot::Sender<()>>,
}

struct Outgoing {
    inflight: HashMap<u16, Inflight>,
    next_pkid: u16,
    buf: BytesMut,
}

impl Outgoing {
    fn encode(&mut self, packet: &ServerPacket) {
        if let Err(e) = codec::encode_server(packet, &mut self.buf) {
            tracing::error!("dropping an outbound packet: {e}");
        }
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Packet(packet) => {
                tracing::debug!(packet = ?packet, "sending");
                self.encode(&packet);
            }
            Control::Acked(pkid) => match self.inflight.remove(&pkid) {
                Some(done) => {
                    if let Some(acked) = done.acked {
                        let _ = acked.send(());
                    }
                }
                None => tracing::debug!(pkid, "PUBACK for no message in flight"),
            },
        }
    }

    fn message(&mut self, message: Message) {
        let Message {
            topic,
            payload,
            qos,
            acked,
        } = message;
        let mut publish = codec::Publish {
            topic,
            payload,
            qos: sessions::qos_number(qos),
            dup: false,
            retain: false,
            pkid: 0,
        };
        if qos == QoS::AtLeastOnce {
            publish.pkid = self.allocate_pkid();
        }
        tracing::debug!(packet = ?publish, "sending");
        let start = self.buf.len();
        if let Err(e) = codec::encode_server(&ServerPacket::Publish(publish.clone()), &mut self.buf)
        {
            self.buf.truncate(start);
            tracing::error!("dropping an outbound message: {e}");
            return;
        }
        if qos == QoS::AtLeastOnce {
            let inflight = Inflight {
                publish,
                sent_at: Instant::now(),
                acked,
            };
            self.inflight.insert(inflight.publish.pkid, inflight);
        }
    }

    /// The next packet id not in flight (there are always free ids: the window is smaller).
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    fn retransmit_at(&self, after: Duration) -> Option<Instant> {
        self.inflight.values().map(|m| m.sent_at + after).min()
    }

    fn retransmit(&mut self, after: Duration) {
        let now = Instant::now();
        let mut due: Vec<u16> = self
            .inflight
            .iter()
            .filter(|(_, m)| m.sent_at + after <= now)
            .map(|(pkid, _)| *pkid)
            .collect();
        due.sort_unstable();
        for pkid in due {
            let Some(message) = self.inflight.get_mut(&pkid) else {
                continue;
            };
            message.publish.dup = true;
            message.sent_at = now;
            let packet = ServerPacket::Publish(message.publish.clone());
            tracing::debug!(pkid, "no PUBACK yet; sending again with DUP");
            self.encode(&packet);
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn write_loop(
    writer: &mut WriteSide,
    control: &mut mpsc::Receiver<Box<Control>>,
    commands: &mut mpsc::Receiver<Box<Message>>,
    limits: &MqttLimits,
) -> CloseReason {
    let window = limits.max_inflight_outbound.clamp(1, 65_000);
    let mut out = Outgoing {
        inflight: HashMap::new(),
        next_pkid: 0,
        // Empty to start: most connections are idle most of the time; it grows on demand.
        buf: BytesMut::new(),
    };
    loop {
        let retransmit_at = out.retransmit_at(limits.retransmit_after);
        tokio::select! {
            next = control.recv() => match next {
                Some(next) => out.control(*next),
                // Both the reader and the worker are gone: the connection is ending anyway.
                None => return CloseReason::ConnectionLost,
            },
            message = commands.recv(), if out.inflight.len() < window => match message {
                Some(message) => out.message(*message),
                None => return CloseReason::ConnectionLost,
            },
            () = sleep_until_some(retransmit_at) => out.retransmit(limits.retransmit_after),
        }
        while out.buf.len() < WRITE_BATCH {
            match control.try_recv() {
                Ok(next) => out.control(*next),
                Err(_) => break,
            }
        }
        while out.buf.len() < WRITE_BATCH && out.inflight.len() < window {
            match commands.try_recv() {
                Ok(message) => out.message(*message),
                Err(_) => break,
            }
        }
        if out.buf.is_empty() {
            continue;
        }
        let written = timeout(WRITE_TIMEOUT, async {
            writer.write_all(&out.buf).await?;
            writer.flush().await
        })
        .await;
        if out.buf.capacity() > KEPT_WRITE_BUFFER {
            // A burst grew it: do not hold that much while idle.
            out.buf = BytesMut::new();
        } else {
            out.buf.clear();
        }
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!("write failed: {e}");
                break;
            }
            Err(_) => {
                tracing::info!("the client has not read for {WRITE_TIMEOUT:?}");
                break;
            }
        }
    }
    // The socket is broken. The reader normally notices at once; until it does (or for at most
    // DRAIN_TIMEOUT) keep taking replies so that packets already read still reach the
    // application.
    let _ = timeout(DRAIN_TIMEOUT, async {
        while control.recv().await.is_some() {}
    })
    .await;
    CloseReason::ConnectionLost
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Bytes a read asks for when no partial packet is buffered. Device packets are mostly small,
/// and an idle connection waits in that read holding the buffer (docs/performance.md).
const SMALL_READ: usize = 256;
/// A read that fills what it asked for doubles the next one's size, up to this.
const LARGE_READ: usize = 16 * 1024;

/// Reads whole packets off a byte stream.
struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_packet_bytes: usize,
    /// Bytes the next read into an empty buffer asks for.
    read_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(io: R, max_packet_bytes: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            max_packet_bytes,
            read_size: SMALL_READ,
        }
    }

    /// The next packet; `None` at end of stream. Cancel-safe: bytes read are kept in the buffer.
    async fn next(&mut self) -> Result<Option<ClientPacket>, ReadError> {
        loop {
            if let Some(packet) = codec::decode_client(&mut self.buf, self.max_packet_bytes)? {
                return Ok(Some(packet));
            }
            // The decoder refuses oversize frames from their header, so the buffer stays below
            // one maximal packet plus one read. When nothing is buffered, a fresh small buffer
            // lets go of the last one (decoded payloads may still share it) so that an idle
            // connection holds only `read_size` bytes; large packets still grow it
            // geometrically.
            let want = self.read_size;
            if self.buf.is_empty() {
                self.buf = BytesMut::with_capacity(want);
            } else {
                self.buf.reserve(want);
            }
            let read = self.io.read_buf(&mut self.buf).await?;
            if read == 0 {
                return Ok(None);
            }
            self.read_size = if read >= want {
                (want * 2).min(LARGE_READ)
            } else {
                SMALL_READ
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::{Bytes, BytesMut};
    use tokio::io::{AsyncRead, ReadBuf};

    use super::codec::{self, ClientPacket};
    use super::{FrameReader, LARGE_READ, SMALL_READ};

    /// Hands out its bytes at most `chunk` at a time.
    struct Trickle {
        bytes: Bytes,
        chunk: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.chunk.min(buf.remaining()).min(self.bytes.len());
            let taken = self.bytes.split_to(n);
            buf.put_slice(&taken);
            Poll::Ready(Ok(()))
        }
    }

    fn publish(pkid: u16, size: usize) -> ClientPacket {
        ClientPacket::Publish(codec::Publish {
            topic: "devices/d/messages/events/".into(),
            payload: Bytes::from(vec![u8::try_from(pkid % 251).unwrap(); size]),
            qos: 1,
            dup: false,
            retain: false,
            pkid,
        })
    }

    #[tokio::test]
    async fn the_frame_reader_reads_small_large_and_split_packets_and_idles_small() {
        let packets = vec![
            ClientPacket::PingReq,
            publish(1, 64),
            publish(2, 200_000),
            publish(3, 10),
            ClientPacket::PingReq,
            publish(4, 3 * LARGE_READ),
        ];
        let mut wire = BytesMut::new();
        for packet in &packets {
            codec::client::encode(packet, &mut wire);
        }
        let wire = wire.freeze();
        // Whole reads, one byte at a time, and chunks that split every packet somewhere.
        for chunk in [usize::MAX, 1, 7, SMALL_READ + 3, 70_000] {
            let io = Trickle {
                bytes: wire.clone(),
                chunk,
            };
            let mut reader = FrameReader::new(io, 1 << 20);
            for expected in &packets {
                let got = reader.next().await.unwrap().unwrap();
                assert_eq!(format!("{got:?}"), format!("{expected:?}"), "chunk {chunk}");
            }
            assert!(reader.next().await.unwrap().is_none(), "chunk {chunk}");
            // Waiting for the next packet holds a small buffer, not the largest one read.
            assert!(
                reader.buf.capacity() <= LARGE_READ,
                "chunk {chunk}: {}",
                reader.buf.capacity()
            );
        }
    }
}
