//! A blocking MQTT 3.1.1 device for tests: rumqttc over openssl-backed TLS trusting only the
//! server's CA bundle, with its own single-threaded runtime. It speaks for the device side of
//! the hub (`{host}/{deviceId}/?api-version=…`) and of DPS (`{idScope}/registrations/{id}/…`).

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use serde_json::Value;

/// How a CONNECT is made.
pub struct Login<'a> {
    pub client_id: &'a str,
    pub username: &'a str,
    pub password: Option<&'a str>,
    /// A client certificate chain and its PKCS#8 key, both PEM.
    pub identity: Option<(&'a str, &'a str)>,
    pub clean_session: bool,
}

/// Why a connection did not come up.
#[derive(Debug, PartialEq)]
pub enum ConnectFailure {
    /// CONNACK with this code.
    Refused(ConnectReturnCode),
    /// No CONNACK: closed, timed out or a TLS failure (the text says which).
    Failed(String),
}

/// A connected device.
pub struct Device {
    runtime: tokio::runtime::Runtime,
    client: AsyncClient,
    events: EventLoop,
    /// PUBLISHes that arrived while waiting for something else (a reply often comes before
    /// the PUBACK of its request).
    received: VecDeque<(String, Vec<u8>)>,
}

const WAIT: Duration = Duration::from_secs(15);

/// Connects to `localhost:port` and waits for CONNACK.
pub fn connect(port: u16, ca_bundle: &Path, login: &Login<'_>) -> Result<Device, ConnectFailure> {
    connect_to("localhost", port, ca_bundle, login)
}

/// Connects to `host:port` (also the TLS name) and waits for CONNACK.
pub fn connect_to(
    host: &str,
    port: u16,
    ca_bundle: &Path,
    login: &Login<'_>,
) -> Result<Device, ConnectFailure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = std::fs::read(ca_bundle).expect("CA bundle");
    let identity = login
        .identity
        .map(|(chain, key)| (chain.as_bytes(), key.as_bytes()));
    let connector = zerotouch_simulate::mqtt::connector(&ca, identity, false).expect("connector");
    let mut options = MqttOptions::new(login.client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(login.clean_session)
        .set_transport(Transport::tls_with_config(
            TlsConfiguration::NativeConnector(connector),
        ));
    options.set_credentials(login.username, login.password.unwrap_or_default());
    let (client, mut events) = AsyncClient::new(options, 16);
    let connack = runtime.block_on(async {
        tokio::time::timeout(WAIT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Ok(code),
                    Err(e) => return Err(ConnectFailure::Failed(e.to_string())),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(ConnectFailure::Failed("no CONNACK in time".into())))
    })?;
    match connack {
        ConnectReturnCode::Success => Ok(Device {
            runtime,
            client,
            events,
            received: VecDeque::new(),
        }),
        code => Err(ConnectFailure::Refused(code)),
    }
}

/// The hub's device username.
pub fn hub_username(device_id: &str) -> String {
    format!("localhost/{device_id}/?api-version=2021-04-12")
}

/// The DPS device username.
pub fn dps_username(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}/api-version=2019-03-31")
}

impl Device {
    /// Publishes at QoS 1 and waits for the PUBACK.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let Device {
            runtime,
            client,
            events,
            received,
        } = self;
        runtime.block_on(async {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(WAIT, async {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.push_back((p.topic, p.payload.to_vec()));
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err("no PUBACK in time".into()))
        })
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        let Device {
            runtime,
            client,
            events,
            received,
        } = self;
        runtime.block_on(async {
            client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(WAIT, async {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.push_back((p.topic, p.payload.to_vec()));
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err("no SUBACK in time".into()))
        })
    }

    /// The next PUBLISH from the server whose topic starts with `prefix`.
    pub fn receive(&mut self, prefix: &str) -> Result<(String, Vec<u8>), String> {
        if let Some(at) = self
            .received
            .iter()
            .position(|(t, _)| t.starts_with(prefix))
        {
            return Ok(self.received.remove(at).expect("position is in range"));
        }
        let deadline = Instant::now() + WAIT;
        let Device {
            runtime, events, ..
        } = self;
        runtime.block_on(async {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.starts_with(prefix) => {
                        return Ok((p.topic, p.payload.to_vec()));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("nothing on {prefix}… in time")),
                }
            }
        })
    }

    /// Registers over DPS's MQTT topics (subscribe, register, poll until done) and returns
    /// the last answer's status and body.
    pub fn register(&mut self, body: &Value) -> Result<(u16, Value), String> {
        self.subscribe("$dps/registrations/res/#")?;
        self.publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            body.to_string().as_bytes(),
        )?;
        for rid in 2..40 {
            let (topic, payload) = self.receive("$dps/registrations/res/")?;
            let status: u16 = topic
                .trim_start_matches("$dps/registrations/res/")
                .split('/')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad topic {topic}"))?;
            let answer: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            if status != 202 {
                return Ok((status, answer));
            }
            let operation = answer["operationId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            std::thread::sleep(Duration::from_millis(200));
            self.publish(
                &format!(
                    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation}"
                ),
                b"",
            )?;
        }
        Err("never done".into())
    }

    pub fn disconnect(self) {
        let Device {
            runtime, client, ..
        } = self;
        let _ = runtime.block_on(client.disconnect());
    }
}
