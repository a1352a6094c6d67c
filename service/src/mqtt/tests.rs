//! The engine over real TLS on 127.0.0.1, driven by a raw test client built on the same codec.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use openssl::ssl::{SslConnector, SslMethod};
use openssl::x509::X509;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use super::codec::{self, ClientPacket, ServerPacket, client};
use super::listener::{self, MqttLimits, MqttListener};
use super::*;
use crate::db::{Collection, DocumentStore};

// ---------------------------------------------------------------------------------------------
// PKI: one CA and server certificate for the whole test binary.

struct Pki {
    acceptor: tokio_rustls::TlsAcceptor,
    trust_bundle: String,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = zerotouch_certs::CaHierarchy::generate("mqtt engine test").unwrap();
        let server = ca
            .issue_server_certificate(&["localhost".to_owned(), "127.0.0.1".to_owned()], 2)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chain = dir.path().join("chain.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&chain, &server.chain_pem).unwrap();
        std::fs::write(&key, server.private_key.expose()).unwrap();
        let acceptor = crate::tls::mqtt_acceptor(&chain, &key).unwrap();
        Pki {
            acceptor,
            trust_bundle: ca.trust_bundle_pem(),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The test application: accepts username "ok", records what happens.

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Connected {
        connection: u64,
        client_id: String,
    },
    Ready {
        connection: u64,
    },
    Published {
        connection: u64,
        topic: String,
        payload: Bytes,
        qos: QoS,
        dup: bool,
    },
    Closed {
        connection: u64,
        reason: CloseReason,
    },
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    outbounds: Mutex<HashMap<String, Outbound>>,
    /// Every connection's outbound handle, by connection id.
    by_connection: Mutex<HashMap<u64, Outbound>>,
    /// The thread each connection's CONNECT was decided on, by connection id.
    threads: Mutex<HashMap<u64, String>>,
    /// What the client presented in the TLS handshake, by client id.
    peers: Mutex<HashMap<String, Option<crate::tls::PeerCertificates>>>,
    slow_done: AtomicBool,
}

impl Recorder {
    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The latest connection of `client_id`.
    fn outbound(&self, client_id: &str) -> Outbound {
        self.outbounds.lock().unwrap()[client_id].clone()
    }

    /// Every connection the application accepted, in order.
    fn connections(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Connected { connection, .. } => Some(connection),
                _ => None,
            })
            .collect()
    }

    fn closed_reason(&self, connection: u64) -> Option<CloseReason> {
        self.events().into_iter().find_map(|e| match e {
            Event::Closed {
                connection: c,
                reason,
            } if c == connection => Some(reason),
            _ => None,
        })
    }

    async fn wait_closed(&self, connection: u64) -> CloseReason {
        let start = Instant::now();
        loop {
            if let Some(reason) = self.closed_reason(connection) {
                let closes = self
                    .events()
                    .iter()
                    .filter(
                        |e| matches!(e, Event::Closed { connection: c, .. } if *c == connection),
                    )
                    .count();
                assert_eq!(closes, 1, "Session::closed called more than once");
                return reason;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "connection {connection} not closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

struct TestApp(Arc<Recorder>);

struct TestSession {
    recorder: Arc<Recorder>,
    connection: u64,
}

impl Application for TestApp {
    fn connect(
        &self,
        request: ConnectRequest,
        outbound: Outbound,
    ) -> BoxFuture<'_, Result<Accepted, Refusal>> {
        Box::pin(async move {
            if request.username.as_deref() != Some("ok") {
                return Err(Refusal::NotAuthorized);
            }
            let connection = outbound.connection_id();
            self.0
                .peers
                .lock()
                .unwrap()
                .insert(request.client_id.clone(), request.peer_certificates.clone());
            let thread = std::thread::current().name().unwrap_or("?").to_owned();
            self.0.threads.lock().unwrap().insert(connection, thread);
            self.0
                .by_connection
                .lock()
                .unwrap()
                .insert(connection, outbound.clone());
            self.0.push(Event::Connected {
                connection,
                client_id: request.client_id.clone(),
            });
            self.0
                .outbounds
                .lock()
                .unwrap()
                .insert(request.client_id.clone(), outbound);
            let expires_at = request
                .password
                .as_deref()
                .and_then(|p| p.strip_prefix("expires_in="))
                .map(|secs| crate::time::now_unix() + secs.parse::<u64>().unwrap());
            Ok(Accepted {
                session: Box::new(TestSession {
                    recorder: self.0.clone(),
                    connection,
                }),
                session_key: format!("test/{}", request.client_id),
                expires_at,
            })
        })
    }
}

impl Session for TestSession {
    fn ready(&self) {
        self.recorder.push(Event::Ready {
            connection: self.connection,
        });
    }

    fn subscribe(&self, filter: &str, requested: QoS) -> SubscribeVerdict {
        if filter.starts_with("deny/") {
            SubscribeVerdict::Refuse
        } else if filter.starts_with("kick/") {
            SubscribeVerdict::Disconnect
        } else {
            SubscribeVerdict::Grant(requested)
        }
    }

    fn publish(&self, message: Inbound) -> BoxFuture<'_, PublishVerdict> {
        let Inbound {
            topic,
            payload,
            qos,
            dup,
            ..
        } = message;
        Box::pin(async move {
            if topic == "kick" {
                return PublishVerdict::Disconnect;
            }
            if let Some(target) = topic.strip_prefix("forward/") {
                // Delivery to another connection (perhaps on another worker), acknowledged
                // to the sender only once the target has sent its PUBACK.
                let outbound = self.recorder.outbound(target);
                return match outbound
                    .publish(format!("to/{target}"), payload, QoS::AtLeastOnce)
                    .await
                {
                    Ok(()) => PublishVerdict::Ack,
                    Err(Closed) => PublishVerdict::Disconnect,
                };
            }
            if let Some(rest) = topic.strip_prefix("later/") {
                // Accepted now, acknowledged once a wait of `rest` ms is over (or refused, for
                // `later/fail`), as the hub does for telemetry until its commit.
                let wait = rest.parse::<u64>().ok();
                self.recorder.push(Event::Published {
                    connection: self.connection,
                    topic,
                    payload,
                    qos,
                    dup,
                });
                return PublishVerdict::AckWhen(Box::pin(async move {
                    match wait {
                        Some(ms) => {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            true
                        }
                        None => false,
                    }
                }));
            }
            let slow = topic.starts_with("slow/");
            self.recorder.push(Event::Published {
                connection: self.connection,
                topic,
                payload,
                qos,
                dup,
            });
            if slow {
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.recorder.slow_done.store(true, Ordering::SeqCst);
            }
            PublishVerdict::Ack
        })
    }

    fn closed(&self, reason: CloseReason) {
        self.recorder.push(Event::Closed {
            connection: self.connection,
            reason,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Harness and raw client.

struct Harness {
    listener: MqttListener,
    recorder: Arc<Recorder>,
    store: Arc<dyn DocumentStore>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// The engine with `workers` worker threads and default limits otherwise.
    async fn with_workers(workers: usize) -> Harness {
        Harness::new(MqttLimits {
            workers,
            ..MqttLimits::default()
        })
        .await
    }

    async fn new(limits: MqttLimits) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let store: Arc<dyn DocumentStore> = Arc::new(crate::db::open(&url).unwrap());
        let recorder = Arc::new(Recorder::default());
        let listener = start_listener(&recorder, &store, limits).await;
        Harness {
            listener,
            recorder,
            store,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }
}

async fn start_listener(
    recorder: &Arc<Recorder>,
    store: &Arc<dyn DocumentStore>,
    limits: MqttLimits,
) -> MqttListener {
    listener::start(
        "127.0.0.1:0".parse().unwrap(),
        pki().acceptor.clone(),
        Arc::new(TestApp(recorder.clone())),
        store.clone(),
        limits,
    )
    .await
    .unwrap()
}

fn connect_packet(client_id: &str, clean_session: bool) -> codec::Connect {
    codec::Connect {
        client_id: client_id.into(),
        username: Some("ok".into()),
        password: None,
        clean_session,
        keep_alive: 30,
        has_will: false,
    }
}

struct Client {
    tls: SslStream<TcpStream>,
    buf: BytesMut,
}

const RECV_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    async fn open(addr: SocketAddr) -> Client {
        Client::open_with(addr, |_| {}).await
    }

    /// Opens a connection whose TLS client `configure` may change (version, certificate).
    async fn open_with(
        addr: SocketAddr,
        configure: impl FnOnce(&mut openssl::ssl::SslConnectorBuilder),
    ) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut builder = SslConnector::builder(SslMethod::tls_client()).unwrap();
        for cert in X509::stack_from_pem(pki().trust_bundle.as_bytes()).unwrap() {
            builder.cert_store_mut().add_cert(cert).unwrap();
        }
        configure(&mut builder);
        let ssl = builder
            .build()
            .configure()
            .unwrap()
            .into_ssl("localhost")
            .unwrap();
        let mut tls = SslStream::new(ssl, tcp).unwrap();
        Pin::new(&mut tls).connect().await.unwrap();
        Client {
            tls,
            buf: BytesMut::new(),
        }
    }

    /// Opens a connection and sends `connect`; returns the client and the CONNACK
    /// (session present, code).
    async fn connect_with(addr: SocketAddr, connect: codec::Connect) -> (Client, bool, u8) {
        let mut client = Client::open(addr).await;
        client.send(ClientPacket::Connect(connect)).await;
        match client.recv().await {
            Some(ServerPacket::ConnAck {
                session_present,
                code,
            }) => (client, session_present, code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects as an accepted client; panics unless CONNACK is 0.
    async fn connect(addr: SocketAddr, client_id: &str, clean_session: bool) -> (Client, bool) {
        let (client, session_present, code) =
            Client::connect_with(addr, connect_packet(client_id, clean_session)).await;
        assert_eq!(code, 0);
        (client, session_present)
    }

    async fn send(&mut self, packet: ClientPacket) {
        let mut buf = BytesMut::new();
        client::encode(&packet, &mut buf);
        self.raw(&buf).await;
    }

    async fn raw(&mut self, bytes: &[u8]) {
        // The server may already have closed; the test then sees that on the next read.
        let _ = self.tls.write_all(bytes).await;
        let _ = self.tls.flush().await;
    }

    /// The next packet, `None` once the server has closed. Panics after RECV_TIMEOUT.
    async fn recv(&mut self) -> Option<ServerPacket> {
        tokio::time::timeout(RECV_TIMEOUT, self.next())
            .await
            .expect("nothing received in time")
    }

    async fn next(&mut self) -> Option<ServerPacket> {
        loop {
            if let Some(packet) = client::decode(&mut self.buf).unwrap() {
                return Some(packet);
            }
            match self.tls.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn expect_closed(&mut self) {
        if let Some(packet) = self.recv().await {
            panic!("expected the server to close, got {packet:?}");
        }
    }

    async fn subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(ClientPacket::Subscribe(codec::Subscribe {
            pkid,
            filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
        }))
        .await;
        match self.recv().await {
            Some(ServerPacket::SubAck { pkid: p, codes }) if p == pkid => codes,
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, qos: u8, pkid: u16) {
        self.send(ClientPacket::Publish(codec::Publish {
            topic: topic.into(),
            payload: Bytes::from_static(b"hello"),
            qos,
            dup: false,
            retain: false,
            pkid,
        }))
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting.

#[tokio::test]
async fn connack_accepts_and_refuses() {
    let h = Harness::new(MqttLimits::default()).await;
    let (_ok, session_present) = Client::connect(h.addr(), "dev1", false).await;
    assert!(!session_present);
    assert_eq!(h.listener.connected_count(), 1);

    let mut bad = connect_packet("dev2", false);
    bad.username = Some("nope".into());
    let (mut refused, _, code) = Client::connect_with(h.addr(), bad).await;
    assert_eq!(code, 5);
    refused.expect_closed().await;

    let mut anonymous = connect_packet("dev3", false);
    anonymous.username = None;
    let (mut refused, _, code) = Client::connect_with(h.addr(), anonymous).await;
    assert_eq!(code, 5);
    refused.expect_closed().await;

    // An empty client id needs CleanSession=1.
    let (mut refused, _, code) = Client::connect_with(h.addr(), connect_packet("", false)).await;
    assert_eq!(code, 2);
    refused.expect_closed().await;
    assert_eq!(h.listener.connected_count(), 1);
}

#[tokio::test]
async fn any_client_certificate_reaches_the_application_over_tls_1_2_and_1_3() {
    use openssl::ssl::SslVersion;
    let h = Harness::new(MqttLimits::default()).await;
    let ec = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
    )
    .unwrap();
    let ec = openssl::pkey::PKey::from_ec_key(ec).unwrap();
    let rsa = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    // Self-signed and unknown to the server: let through, for the application to judge.
    let ec_cert = crate::tls::tests::self_signed(&ec, "ec-device", true);
    let rsa_cert = crate::tls::tests::self_signed(&rsa, "rsa-device", true);
    // What webpki (rustls's own check) would refuse: a P-521 key in an X.509 v1 certificate.
    let p521 = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP521R1).unwrap(),
    )
    .unwrap();
    let p521 = openssl::pkey::PKey::from_ec_key(p521).unwrap();
    let p521_cert = crate::tls::tests::self_signed(&p521, "p521-v1-device", false);
    // A leaf sent with an "intermediate" (here any other certificate) after it.
    let intermediate = crate::tls::tests::self_signed(&ec, "some intermediate", true);

    let cases = [
        ("ec13", SslVersion::TLS1_3, Some((&ec, &ec_cert)), None),
        (
            "ec12",
            SslVersion::TLS1_2,
            Some((&ec, &ec_cert)),
            Some(&intermediate),
        ),
        (
            "rsa13",
            SslVersion::TLS1_3,
            Some((&rsa, &rsa_cert)),
            Some(&intermediate),
        ),
        ("rsa12", SslVersion::TLS1_2, Some((&rsa, &rsa_cert)), None),
        (
            "p521v1-13",
            SslVersion::TLS1_3,
            Some((&p521, &p521_cert)),
            None,
        ),
        (
            "p521v1-12",
            SslVersion::TLS1_2,
            Some((&p521, &p521_cert)),
            None,
        ),
        ("none13", SslVersion::TLS1_3, None, None),
        ("none12", SslVersion::TLS1_2, None, None),
    ];
    let mut clients = Vec::new();
    for (client_id, version, identity, extra) in cases {
        let client = Client::open_with(h.addr(), |builder| {
            builder.set_min_proto_version(Some(version)).unwrap();
            builder.set_max_proto_version(Some(version)).unwrap();
            if let Some((key, cert)) = identity {
                builder.set_private_key(key).unwrap();
                builder.set_certificate(cert).unwrap();
            }
            if let Some(extra) = extra {
                builder.add_extra_chain_cert(extra.clone()).unwrap();
            }
        })
        .await;
        assert_eq!(
            client.tls.ssl().version2(),
            Some(version),
            "{client_id}: negotiated version"
        );
        let mut client = client;
        client
            .send(ClientPacket::Connect(connect_packet(client_id, true)))
            .await;
        assert!(
            matches!(
                client.recv().await,
                Some(ServerPacket::ConnAck { code: 0, .. })
            ),
            "{client_id}: CONNACK 0"
        );
        clients.push(client);

        let peer = h
            .recorder
            .peers
            .lock()
            .unwrap()
            .get(client_id)
            .cloned()
            .unwrap();
        match identity {
            None => assert!(peer.is_none(), "{client_id}: presented nothing"),
            Some((_, cert)) => {
                let peer = peer.unwrap_or_else(|| panic!("{client_id}: no certificate"));
                assert_eq!(peer.leaf, cert.to_der().unwrap(), "{client_id}: leaf");
                let chain: Vec<Vec<u8>> = extra.iter().map(|c| c.to_der().unwrap()).collect();
                assert_eq!(
                    peer.chain, chain,
                    "{client_id}: the certificates after the leaf"
                );
            }
        }
    }
}

#[tokio::test]
async fn other_protocol_versions_get_connack_1() {
    let h = Harness::new(MqttLimits::default()).await;
    let mut client = Client::open(h.addr()).await;
    // MQTT 3.1 ("MQIsdp", level 3), client id "a".
    client
        .raw(&[
            0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 1, b'a',
        ])
        .await;
    assert_eq!(
        client.recv().await,
        Some(ServerPacket::ConnAck {
            session_present: false,
            code: 1
        })
    );
    client.expect_closed().await;
}

#[tokio::test]
async fn first_packet_must_be_connect() {
    let h = Harness::new(MqttLimits::default()).await;
    let mut client = Client::open(h.addr()).await;
    client.send(ClientPacket::PingReq).await;
    client.expect_closed().await;
}

#[tokio::test]
async fn connect_must_arrive_in_time() {
    let limits = MqttLimits {
        connect_timeout: Duration::from_millis(200),
        ..MqttLimits::default()
    };
    let h = Harness::new(limits).await;
    let mut client = Client::open(h.addr()).await;
    let start = Instant::now();
    client.expect_closed().await;
    assert!(start.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn garbage_closes_and_the_listener_keeps_serving() {
    let h = Harness::new(MqttLimits::default()).await;
    let mut client = Client::open(h.addr()).await;
    client
        .raw(b"\xff\xff\xff\xff\xff\xffGET / HTTP/1.1\r\n\r\n")
        .await;
    client.expect_closed().await;

    // Not even TLS.
    let mut plain = TcpStream::connect(h.addr()).await.unwrap();
    plain.write_all(b"\x10\x00garbage").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(RECV_TIMEOUT, plain.read_to_end(&mut sink)).await;

    let (_client, _) = Client::connect(h.addr(), "after-garbage", true).await;
}

#[tokio::test]
async fn oversize_packets_close() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "big", true).await;
    let connection = h.recorder.outbound("big").connection_id();
    // PUBLISH announcing 300,000 bytes (over 264 KiB), then the start of it.
    client.raw(&[0x30, 0xE0, 0xA7, 0x12, 0, 1, b't']).await;
    client.expect_closed().await;
    assert!(matches!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ProtocolError(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// Inbound PUBLISH.

#[tokio::test]
async fn qos1_puback_waits_for_the_application() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "slow", true).await;
    let start = Instant::now();
    client.publish("slow/telemetry", 1, 7).await;
    // A PINGREQ sent after the PUBLISH is answered while the application is still busy.
    client.send(ClientPacket::PingReq).await;
    assert_eq!(client.recv().await, Some(ServerPacket::PingResp));
    assert!(!h.recorder.slow_done.load(Ordering::SeqCst));
    assert_eq!(client.recv().await, Some(ServerPacket::PubAck(7)));
    assert!(h.recorder.slow_done.load(Ordering::SeqCst));
    assert!(start.elapsed() >= Duration::from_millis(300));

    let published = h.recorder.events().into_iter().any(|e| {
        matches!(e, Event::Published { topic, qos: QoS::AtLeastOnce, dup: false, payload, .. }
            if topic == "slow/telemetry" && payload == Bytes::from_static(b"hello"))
    });
    assert!(published);
}

#[tokio::test]
async fn acks_that_wait_let_later_packets_through_and_keep_their_order() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "pipelined", true).await;
    let start = Instant::now();
    // The first waits longest; a plain PUBLISH and a SUBSCRIBE come behind them.
    client.publish("later/400", 1, 1).await;
    client.publish("later/50", 1, 2).await;
    client.publish("t/3", 1, 3).await;
    client
        .send(ClientPacket::Subscribe(codec::Subscribe {
            pkid: 4,
            filters: vec![("devices/pipelined/#".into(), 1)],
        }))
        .await;
    // Every PUBLISH reached the application while the first was still waiting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while published(&h.recorder) < 3 {
        assert!(
            Instant::now() < deadline,
            "the later PUBLISHes never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(start.elapsed() < Duration::from_millis(400));
    // The replies go out in packet order, once the first wait is over.
    assert_eq!(client.recv().await, Some(ServerPacket::PubAck(1)));
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert_eq!(client.recv().await, Some(ServerPacket::PubAck(2)));
    assert_eq!(client.recv().await, Some(ServerPacket::PubAck(3)));
    assert!(matches!(
        client.recv().await,
        Some(ServerPacket::SubAck { pkid: 4, .. })
    ));

    // More than MAX_WAITING_ACKS at once: all acknowledged, in order.
    let count = u16::try_from(MAX_WAITING_ACKS * 2 + 3).unwrap();
    for pkid in 10..10 + count {
        client.publish("later/20", 1, pkid).await;
    }
    for pkid in 10..10 + count {
        assert_eq!(client.recv().await, Some(ServerPacket::PubAck(pkid)));
    }

    // A wait that fails closes the connection, and the reply behind it never goes out.
    let connection = h.recorder.outbound("pipelined").connection_id();
    client.publish("later/fail", 1, 100).await;
    client.publish("t/after", 1, 101).await;
    client.expect_closed().await;
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ClosedByApplication
    );
}

/// How many PUBLISHes the application has seen.
fn published(recorder: &Recorder) -> usize {
    recorder
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Published { .. }))
        .count()
}

#[tokio::test]
async fn duplicate_qos1_is_acked_again() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "dup", true).await;
    client.publish("t/1", 1, 3).await;
    assert_eq!(client.recv().await, Some(ServerPacket::PubAck(3)));
    client
        .send(ClientPacket::Publish(codec::Publish {
            topic: "t/1".into(),
            payload: Bytes::from_static(b"hello"),
            qos: 1,
            dup: true,
            retain: false,
            pkid: 3,
        }))
        .await;
    assert_eq!(client.recv().await, Some(ServerPacket::PubAck(3)));
    let dups: Vec<bool> = h
        .recorder
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Published { dup, .. } => Some(dup),
            _ => None,
        })
        .collect();
    assert_eq!(dups, vec![false, true]);
}

#[tokio::test]
async fn qos2_and_wildcard_publishes_close() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "q2", true).await;
    let connection = h.recorder.outbound("q2").connection_id();
    client.publish("t/1", 2, 1).await;
    client.expect_closed().await;
    assert!(matches!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ProtocolError(_)
    ));

    let (mut client, _) = Client::connect(h.addr(), "wild", true).await;
    client.publish("t/+", 0, 0).await;
    client.expect_closed().await;
    assert!(
        !h.recorder
            .events()
            .iter()
            .any(|e| matches!(e, Event::Published { .. }))
    );
}

#[tokio::test]
async fn application_can_refuse_a_publish() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "kicked", true).await;
    let connection = h.recorder.outbound("kicked").connection_id();
    client.publish("kick", 1, 1).await;
    client.expect_closed().await;
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ClosedByApplication
    );
}

#[tokio::test]
async fn publishes_before_disconnect_reach_the_application() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "bye", true).await;
    let connection = h.recorder.outbound("bye").connection_id();
    let mut buf = BytesMut::new();
    for (topic, qos, pkid) in [("slow/a", 1, 1), ("t/b", 0, 0)] {
        client::encode(
            &ClientPacket::Publish(codec::Publish {
                topic: topic.into(),
                payload: Bytes::new(),
                qos,
                dup: false,
                retain: false,
                pkid,
            }),
            &mut buf,
        );
    }
    client::encode(&ClientPacket::Disconnect, &mut buf);
    client.raw(&buf).await;
    drop(client);
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ClientDisconnect
    );
    let topics: Vec<String> = h
        .recorder
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Published { topic, .. } => Some(topic),
            _ => None,
        })
        .collect();
    assert_eq!(topics, vec!["slow/a", "t/b"]);
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE.

#[tokio::test]
async fn subscribe_grants_refuses_and_limits() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "subs", true).await;
    let codes = client
        .subscribe(
            1,
            &[
                ("a/b", 1),
                ("deny/x", 1),
                ("c/d", 2),
                ("e/f", 0),
                ("bad/#/x", 1),
            ],
        )
        .await;
    assert_eq!(codes, vec![1, 0x80, 1, 0, 0x80]);

    // Three held; the limit is 8.
    let more: Vec<String> = (0..7).map(|i| format!("more/{i}")).collect();
    let filters: Vec<(&str, u8)> = more.iter().map(|f| (f.as_str(), 1)).collect();
    let codes = client.subscribe(2, &filters).await;
    assert_eq!(codes, vec![1, 1, 1, 1, 1, 0x80, 0x80]);
    // Re-subscribing to a held filter is not a new subscription.
    assert_eq!(client.subscribe(3, &[("a/b", 0)]).await, vec![0]);

    let outbound = h.recorder.outbound("subs");
    assert!(outbound.is_subscribed("more/4"));
    assert!(!outbound.is_subscribed("more/5"));
    assert!(!outbound.is_subscribed("deny/x"));

    client
        .send(ClientPacket::Unsubscribe(codec::Unsubscribe {
            pkid: 4,
            filters: vec!["a/b".into(), "never/subscribed".into()],
        }))
        .await;
    assert_eq!(client.recv().await, Some(ServerPacket::UnsubAck(4)));
    assert!(!outbound.is_subscribed("a/b"));
    assert_eq!(client.subscribe(5, &[("more/5", 1)]).await, vec![1]);

    // Full again: a new filter is refused without asking the application.
    assert_eq!(client.subscribe(6, &[("kick/me", 1)]).await, vec![0x80]);

    // The application can close the connection over a subscription.
    let (mut client, _) = Client::connect(h.addr(), "kick-sub", true).await;
    let connection = h.recorder.outbound("kick-sub").connection_id();
    client
        .send(ClientPacket::Subscribe(codec::Subscribe {
            pkid: 1,
            filters: vec![("kick/me".into(), 1)],
        }))
        .await;
    client.expect_closed().await;
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ClosedByApplication
    );
}

#[tokio::test]
async fn is_subscribed_follows_wildcard_rules() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "wild", true).await;
    let codes = client
        .subscribe(
            1,
            &[
                ("a/+/c", 1),
                ("b/#", 1),
                ("$iothub/twin/res/#", 1),
                ("+/x", 1),
            ],
        )
        .await;
    assert_eq!(codes, vec![1, 1, 1, 1]);
    let outbound = h.recorder.outbound("wild");
    for (topic, expected) in [
        ("a/1/c", true),
        ("a/1/2/c", false),
        ("a//c", true),
        ("b", true),
        ("b/1/2", true),
        ("bb/1", false),
        ("$iothub/twin/res/200/?$rid=1", true),
        ("$iothub/twin/PATCH/properties/desired/?$version=2", false),
        ("y/x", true),
        ("$sys/x", false),
    ] {
        assert_eq!(outbound.is_subscribed(topic), expected, "{topic}");
    }
}

// ---------------------------------------------------------------------------------------------
// Outbound PUBLISH.

#[tokio::test]
async fn outbound_qos1_resolves_on_puback_and_fails_when_closed() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "c2d", true).await;
    let outbound = h.recorder.outbound("c2d");

    let sending = tokio::spawn({
        let outbound = outbound.clone();
        async move {
            outbound
                .publish(
                    "devices/c2d/messages/devicebound/".into(),
                    Bytes::from_static(b"one"),
                    QoS::AtLeastOnce,
                )
                .await
        }
    });
    let Some(ServerPacket::Publish(first)) = client.recv().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(
        (first.qos, first.dup, first.payload.as_ref()),
        (1, false, &b"one"[..])
    );
    assert_ne!(first.pkid, 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!sending.is_finished(), "resolved before PUBACK");
    client.send(ClientPacket::PubAck(first.pkid)).await;
    assert_eq!(sending.await.unwrap(), Ok(()));

    // QoS 0 resolves once queued and arrives without a packet id.
    outbound
        .publish("t/zero".into(), Bytes::from_static(b"0"), QoS::AtMostOnce)
        .await
        .unwrap();
    let Some(ServerPacket::Publish(zero)) = client.recv().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!((zero.qos, zero.pkid), (0, 0));

    // Fire-and-forget QoS 1 still carries a fresh packet id.
    outbound
        .send("t/one".into(), Bytes::from_static(b"1"), QoS::AtLeastOnce)
        .unwrap();
    let Some(ServerPacket::Publish(fire)) = client.recv().await else {
        panic!("expected PUBLISH");
    };
    assert_eq!(fire.qos, 1);
    assert_ne!(fire.pkid, first.pkid);

    // Not acknowledged, then the client goes away: the publisher learns it failed.
    let unacked = tokio::spawn({
        let outbound = outbound.clone();
        async move {
            outbound
                .publish("t/lost".into(), Bytes::new(), QoS::AtLeastOnce)
                .await
        }
    });
    assert!(matches!(
        client.recv().await,
        Some(ServerPacket::Publish(_))
    ));
    drop(client);
    assert_eq!(unacked.await.unwrap(), Err(Closed));
    assert!(outbound.is_closed());
    assert_eq!(
        outbound.send("t/x".into(), Bytes::new(), QoS::AtMostOnce),
        Err(Closed)
    );
    assert_eq!(
        h.recorder.wait_closed(outbound.connection_id()).await,
        CloseReason::ConnectionLost
    );
}

#[tokio::test]
async fn outbound_qos1_is_retransmitted_with_dup() {
    let limits = MqttLimits {
        retransmit_after: Duration::from_millis(200),
        ..MqttLimits::default()
    };
    let h = Harness::new(limits).await;
    let (mut client, _) = Client::connect(h.addr(), "re", true).await;
    let outbound = h.recorder.outbound("re");
    outbound
        .send("t/again".into(), Bytes::new(), QoS::AtLeastOnce)
        .unwrap();
    let Some(ServerPacket::Publish(first)) = client.recv().await else {
        panic!("expected PUBLISH");
    };
    let Some(ServerPacket::Publish(again)) = client.recv().await else {
        panic!("expected the PUBLISH again");
    };
    assert_eq!(
        (again.pkid, again.dup, first.dup),
        (first.pkid, true, false)
    );
    client.send(ClientPacket::PubAck(first.pkid)).await;
    // Acknowledged: nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(400), client.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn application_close_and_invalid_topics() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "closing", true).await;
    let outbound = h.recorder.outbound("closing");
    assert_eq!(
        outbound.send("a/#".into(), Bytes::new(), QoS::AtMostOnce),
        Err(Closed),
        "wildcards cannot be published"
    );
    assert!(!outbound.is_closed());
    outbound.close();
    client.expect_closed().await;
    assert_eq!(
        h.recorder.wait_closed(outbound.connection_id()).await,
        CloseReason::ClosedByApplication
    );
    assert!(outbound.is_closed());
    assert_eq!(h.listener.connected_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Sessions.

async fn stored_filters(store: &Arc<dyn DocumentStore>, key: &str) -> Option<serde_json::Value> {
    let store = store.clone();
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || store.get(Collection::MqttSessions, &key).unwrap())
        .await
        .unwrap()
        .map(|d| d.body)
}

#[tokio::test]
async fn persistent_subscriptions_survive_reconnects_and_restarts() {
    let h = Harness::new(MqttLimits::default()).await;
    let filter = "devices/d1/messages/devicebound/#";
    let c2d = "devices/d1/messages/devicebound/%24.mid=1";
    let (mut client, present) = Client::connect(h.addr(), "d1", false).await;
    assert!(!present);
    assert_eq!(
        client
            .subscribe(1, &[(filter, 1), ("$iothub/twin/res/#", 0)])
            .await,
        vec![1, 0]
    );
    assert_eq!(
        stored_filters(&h.store, "test/d1").await,
        Some(serde_json::json!({"subscriptions": [
            {"filter": "$iothub/twin/res/#", "qos": 0},
            {"filter": filter, "qos": 1},
        ]}))
    );
    client.send(ClientPacket::Disconnect).await;
    client.expect_closed().await;

    let (_client, present) = Client::connect(h.addr(), "d1", false).await;
    assert!(present);
    assert!(h.recorder.outbound("d1").is_subscribed(c2d));

    // A new listener on the same store still knows the session.
    h.listener.shutdown();
    tokio::time::timeout(RECV_TIMEOUT, h.listener.stopped())
        .await
        .unwrap();
    let listener = start_listener(&h.recorder, &h.store, MqttLimits::default()).await;
    let (mut client, present) = Client::connect(listener.local_addr(), "d1", false).await;
    assert!(present);
    assert!(h.recorder.outbound("d1").is_subscribed(c2d));
    // UNSUBSCRIBE is stored too.
    client
        .send(ClientPacket::Unsubscribe(codec::Unsubscribe {
            pkid: 2,
            filters: vec!["$iothub/twin/res/#".into()],
        }))
        .await;
    assert_eq!(client.recv().await, Some(ServerPacket::UnsubAck(2)));
    assert_eq!(
        stored_filters(&h.store, "test/d1").await,
        Some(serde_json::json!({"subscriptions": [{"filter": filter, "qos": 1}]}))
    );
    drop(client);

    // CleanSession=1 drops the stored session and stores nothing new.
    let (mut client, present) = Client::connect(listener.local_addr(), "d1", true).await;
    assert!(!present);
    assert!(!h.recorder.outbound("d1").is_subscribed(c2d));
    assert_eq!(client.subscribe(3, &[(filter, 1)]).await, vec![1]);
    assert_eq!(stored_filters(&h.store, "test/d1").await, None);
    drop(client);

    let (_client, present) = Client::connect(listener.local_addr(), "d1", false).await;
    assert!(!present);
    assert!(!h.recorder.outbound("d1").is_subscribed(c2d));
    listener.shutdown();
}

/// A CleanSession=1 CONNECT with no stored session writes nothing, so it does not queue behind
/// the database's writers: it used to delete the (absent) session on every connect, which on
/// SQLite under telemetry load held CONNACKs for up to seconds. Here another connection holds
/// SQLite's write lock through the whole connect.
#[tokio::test]
async fn a_clean_connect_without_a_stored_session_needs_no_write() {
    use diesel::connection::SimpleConnection as _;
    let h = Harness::new(MqttLimits::default()).await;
    let path = h._dir.path().join("t.db");
    let mut writer =
        <diesel::SqliteConnection as diesel::Connection>::establish(&path.display().to_string())
            .unwrap();
    writer.batch_execute("BEGIN IMMEDIATE").unwrap();
    // Well inside SQLite's 5 s busy timeout: a connect that waits for the lock cannot make it.
    let connected = tokio::time::timeout(
        Duration::from_secs(3),
        Client::connect(h.addr(), "clean-1", true),
    )
    .await;
    writer.batch_execute("ROLLBACK").unwrap();
    let (_client, present) = connected.expect("CONNACK while another writer holds the lock");
    assert!(!present);
}

#[tokio::test]
async fn a_second_connection_takes_the_session_over() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut first, _) = Client::connect(h.addr(), "twice", false).await;
    let first_id = h.recorder.outbound("twice").connection_id();
    let (_second, _) = Client::connect(h.addr(), "twice", false).await;
    // The old session was closed before the new CONNACK went out.
    assert_eq!(
        h.recorder.closed_reason(first_id),
        Some(CloseReason::TakenOver)
    );
    first.expect_closed().await;
    let second_id = h.recorder.outbound("twice").connection_id();
    assert_ne!(first_id, second_id);
    assert_eq!(h.recorder.closed_reason(second_id), None);
    assert_eq!(h.listener.connected_count(), 1);
    let ready = h
        .recorder
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Ready { .. }))
        .count();
    assert_eq!(ready, 2);
}

#[tokio::test]
async fn reconnects_are_rate_limited() {
    let limits = MqttLimits {
        reconnects_per_minute: 3,
        ..MqttLimits::default()
    };
    let h = Harness::new(limits).await;
    for _ in 0..3 {
        let (client, _) = Client::connect(h.addr(), "loop", true).await;
        drop(client);
    }
    let (mut client, _, code) = Client::connect_with(h.addr(), connect_packet("loop", true)).await;
    assert_eq!(code, 3);
    client.expect_closed().await;
    // Other session keys are not affected.
    let (_client, _) = Client::connect(h.addr(), "calm", true).await;
}

// ---------------------------------------------------------------------------------------------
// Timers and shutdown.

#[tokio::test]
async fn pingreq_gets_pingresp() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut client, _) = Client::connect(h.addr(), "ping", true).await;
    for _ in 0..2 {
        client.send(ClientPacket::PingReq).await;
        assert_eq!(client.recv().await, Some(ServerPacket::PingResp));
    }
}

#[tokio::test]
async fn keep_alive_timeout_closes() {
    let h = Harness::new(MqttLimits::default()).await;
    let mut connect = connect_packet("idle", true);
    connect.keep_alive = 1;
    let (mut client, _, code) = Client::connect_with(h.addr(), connect).await;
    assert_eq!(code, 0);
    let start = Instant::now();
    client.expect_closed().await;
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let connection = h.recorder.outbound("idle").connection_id();
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::KeepAliveTimeout
    );
}

#[tokio::test]
async fn expired_credentials_close() {
    let h = Harness::new(MqttLimits::default()).await;
    let mut connect = connect_packet("expiring", true);
    connect.password = Some("expires_in=1".into());
    let (mut client, _, code) = Client::connect_with(h.addr(), connect).await;
    assert_eq!(code, 0);
    let start = Instant::now();
    client.expect_closed().await;
    assert!(start.elapsed() < Duration::from_millis(2500));
    let connection = h.recorder.outbound("expiring").connection_id();
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::CredentialsExpired
    );
}

#[tokio::test]
async fn shutdown_closes_every_connection() {
    let h = Harness::new(MqttLimits::default()).await;
    let (mut accepted, _) = Client::connect(h.addr(), "s1", true).await;
    // One more that has not sent CONNECT yet.
    let mut pending = Client::open(h.addr()).await;
    let connection = h.recorder.outbound("s1").connection_id();
    h.listener.shutdown();
    accepted.expect_closed().await;
    pending.expect_closed().await;
    tokio::time::timeout(RECV_TIMEOUT, h.listener.stopped())
        .await
        .unwrap();
    assert_eq!(
        h.recorder.wait_closed(connection).await,
        CloseReason::ServerShutdown
    );
    assert_eq!(h.listener.connected_count(), 0);
    assert!(TcpStream::connect(h.addr()).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Several workers: connections of one listener on different threads at once.

#[tokio::test]
async fn connections_are_spread_over_every_worker() {
    let h = Harness::with_workers(3).await;
    assert_eq!(h.listener.workers(), 3);
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(Client::connect(h.addr(), &format!("spread-{i}"), true).await);
    }
    let threads: std::collections::BTreeSet<String> = h
        .recorder
        .threads
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    assert_eq!(
        threads,
        ["mqtt-worker-0", "mqtt-worker-1", "mqtt-worker-2"]
            .map(String::from)
            .into()
    );
    assert_eq!(h.listener.connected_count(), 6);
}

#[tokio::test]
async fn delivery_crosses_workers_with_qos1() {
    let h = Harness::with_workers(2).await;
    let (mut sender, _) = Client::connect(h.addr(), "sender", true).await;
    let (mut target, _) = Client::connect(h.addr(), "target", true).await;
    let threads = h.recorder.threads.lock().unwrap().clone();
    let sender_id = h.recorder.outbound("sender").connection_id();
    let target_id = h.recorder.outbound("target").connection_id();
    assert_ne!(threads[&sender_id], threads[&target_id], "{threads:?}");

    for round in 1..=3u16 {
        sender.publish("forward/target", 1, round).await;
        let Some(ServerPacket::Publish(delivered)) = target.recv().await else {
            panic!("expected the forwarded PUBLISH");
        };
        assert_eq!(
            (
                delivered.topic.as_str(),
                delivered.qos,
                delivered.payload.as_ref()
            ),
            ("to/target", 1, &b"hello"[..])
        );
        // The sender's PUBACK waits for the target's.
        tokio::time::sleep(Duration::from_millis(30)).await;
        target.send(ClientPacket::PubAck(delivered.pkid)).await;
        assert_eq!(sender.recv().await, Some(ServerPacket::PubAck(round)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_races_across_workers_leave_one_connection_and_the_session() {
    let h = Harness::with_workers(4).await;
    // A persistent session with a subscription, then many connections of the same client id
    // at once, landing on every worker.
    let (mut first, _) = Client::connect(h.addr(), "racer", false).await;
    assert_eq!(first.subscribe(1, &[("kept/#", 1)]).await, vec![1]);
    const RACERS: usize = 12;
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let addr = h.addr();
            tokio::spawn(async move {
                let mut client = Client::open(addr).await;
                client
                    .send(ClientPacket::Connect(connect_packet("racer", false)))
                    .await;
                let connack = client.recv().await;
                (client, connack)
            })
        })
        .collect();
    let mut answered = Vec::new();
    for racer in racers {
        let (client, connack) = racer.await.unwrap();
        match connack {
            // Taken over before its CONNACK went out: closed without one.
            None => {}
            Some(ServerPacket::ConnAck {
                session_present,
                code: 0,
            }) => {
                assert!(session_present, "a racer found no stored session");
                answered.push(client);
            }
            other => panic!("unexpected answer to CONNECT: {other:?}"),
        }
    }
    first.expect_closed().await;
    assert!(!answered.is_empty());

    // Exactly one connection is left, and every other one was closed exactly once as taken
    // over; the survivor is the one the registry holds.
    let deadline = Instant::now() + RECV_TIMEOUT;
    let survivor = loop {
        let connected: Vec<u64> = h
            .recorder
            .connections()
            .into_iter()
            .filter(|c| h.recorder.closed_reason(*c).is_none())
            .collect();
        if connected.len() == 1 {
            break connected[0];
        }
        assert!(Instant::now() < deadline, "still open: {connected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let connections = h.recorder.connections();
    assert_eq!(connections.len(), RACERS + 1);
    for connection in connections.iter().filter(|c| **c != survivor) {
        assert_eq!(
            h.recorder.wait_closed(*connection).await,
            CloseReason::TakenOver
        );
    }
    assert_eq!(h.listener.connected_count(), 1);

    // The survivor still holds the session: a message to the stored subscription reaches it.
    let outbound = h.recorder.by_connection.lock().unwrap()[&survivor].clone();
    let delivered = tokio::spawn(async move {
        outbound
            .publish("kept/x".into(), Bytes::from_static(b"k"), QoS::AtLeastOnce)
            .await
    });
    let mut got = None;
    for client in &mut answered {
        match tokio::time::timeout(Duration::from_millis(500), client.next()).await {
            Ok(Some(ServerPacket::Publish(p))) => {
                client.send(ClientPacket::PubAck(p.pkid)).await;
                got = Some(p);
            }
            Ok(None) | Err(_) => {}
            Ok(Some(other)) => panic!("unexpected packet {other:?}"),
        }
    }
    assert_eq!(got.map(|p| p.topic), Some("kept/x".to_owned()));
    assert_eq!(delivered.await.unwrap(), Ok(()));
    let stored = stored_filters(&h.store, "test/racer").await;
    assert!(stored.is_some_and(|s| s.to_string().contains("kept/#")));
}

#[tokio::test]
async fn shutdown_closes_connections_on_every_worker_and_ends_the_workers() {
    let h = Harness::with_workers(3).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(
            Client::connect(h.addr(), &format!("down-{i}"), true)
                .await
                .0,
        );
    }
    assert_eq!(h.listener.workers_running(), 3);
    h.listener.shutdown();
    for client in &mut clients {
        client.expect_closed().await;
    }
    tokio::time::timeout(RECV_TIMEOUT, h.listener.stopped())
        .await
        .unwrap();
    let ids: Vec<u64> = h.recorder.threads.lock().unwrap().keys().copied().collect();
    assert_eq!(ids.len(), 6);
    for id in ids {
        assert_eq!(
            h.recorder.wait_closed(id).await,
            CloseReason::ServerShutdown
        );
    }
    let deadline = Instant::now() + RECV_TIMEOUT;
    while h.listener.workers_running() > 0 {
        assert!(Instant::now() < deadline, "the workers did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
