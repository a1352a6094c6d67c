//! MQTT 3.1.1 packets on the wire.
//!
//! This is the only file that knows the codec crate (rumqttc's `mqttbytes::v4`); the rest of
//! the engine sees [`ClientPacket`] and [`ServerPacket`]. Swapping the codec (vendoring it, or
//! moving to another crate) means rewriting this file only.
//!
//! **Invariant:** decoding never panics, whatever the bytes: every failure is a
//! [`DecodeError`], and a frame longer than the limit is refused from its fixed header, before
//! its body is buffered.

use std::fmt;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{self as wire, Packet};
use rumqttc::mqttbytes::{self, PacketType};

/// A packet a client sends to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientPacket {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect,
    /// A well-formed packet a server never accepts from a client here (CONNACK, SUBACK, the
    /// QoS 2 flow, …), named for the logs.
    Unexpected(&'static str),
}

/// A packet the server sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerPacket {
    ConnAck { session_present: bool, code: u8 },
    Publish(Publish),
    PubAck(u16),
    SubAck { pkid: u16, codes: Vec<u8> },
    UnsubAck(u16),
    PingResp,
}

/// CONNECT, protocol level 4 (other levels are [`DecodeError::UnsupportedProtocol`]).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Connect {
    pub client_id: String,
    /// `None` when absent or empty (the codec cannot tell those apart).
    pub username: Option<String>,
    /// `None` when absent or empty.
    pub password: Option<String>,
    pub clean_session: bool,
    pub keep_alive: u16,
    /// Whether a Will was given (parsed, then ignored by the engine).
    pub has_will: bool,
}

impl fmt::Debug for Connect {
    // Never prints the password: it is usually a SAS token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("has_will", &self.has_will)
            .finish()
    }
}

/// PUBLISH in either direction.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Publish {
    pub topic: String,
    pub payload: Bytes,
    /// 0, 1 or 2 as on the wire.
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    /// 0 for QoS 0.
    pub pkid: u16,
}

impl fmt::Debug for Publish {
    // Payloads are device data: the logs get their size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("dup", &self.dup)
            .field("retain", &self.retain)
            .field("pkid", &self.pkid)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscribe {
    pub pkid: u16,
    /// Filter and requested QoS (0, 1 or 2).
    pub filters: Vec<(String, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The fixed header announces more than the limit (remaining length in bytes).
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A CONNECT for another protocol version (MQTT 3.1 `MQIsdp`, MQTT 5): CONNACK 0x01.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error("malformed packet: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode packet: {0}")]
pub(crate) struct EncodeError(String);

/// Takes one complete client packet off the front of `buf`; `Ok(None)` when more bytes are
/// needed. On error the connection must be closed (the buffer is left in an unspecified state).
pub(crate) fn decode_client(
    buf: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Option<ClientPacket>, DecodeError> {
    // Judge the packet type from the first byte, before waiting for a length's worth of bytes:
    // reserved types (0, 15) and packets only a server sends are garbage from a client.
    if let Some(first) = buf.first()
        && matches!(first >> 4, 0 | 2 | 9 | 11 | 13 | 15)
    {
        return Err(DecodeError::Malformed(format!(
            "packet type {} is not one a client sends",
            first >> 4
        )));
    }
    let header = match mqttbytes::check(buf.iter(), max_packet_bytes) {
        Ok(header) => header,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(len)) => {
            return Err(DecodeError::TooLarge(len));
        }
        Err(e) => return Err(DecodeError::Malformed(e.to_string())),
    };
    if matches!(header.packet_type(), Ok(PacketType::Connect)) {
        let frame = buf.get(..header.frame_length()).unwrap_or_default();
        let (name, level) = connect_protocol(frame)
            .ok_or_else(|| DecodeError::Malformed("truncated CONNECT header".into()))?;
        if name != "MQTT" || level != 4 {
            return Err(if name == "MQTT" || name == "MQIsdp" {
                DecodeError::UnsupportedProtocol { name, level }
            } else {
                DecodeError::Malformed("unknown protocol name".into())
            });
        }
    }
    let packet = Packet::read(buf, max_packet_bytes).map_err(|e| match e {
        mqttbytes::Error::PayloadSizeLimitExceeded(len) => DecodeError::TooLarge(len),
        e => DecodeError::Malformed(e.to_string()),
    })?;
    Ok(Some(match packet {
        Packet::Connect(c) => {
            let (username, password) = match c.login {
                Some(login) => (non_empty(login.username), non_empty(login.password)),
                None => (None, None),
            };
            ClientPacket::Connect(Connect {
                client_id: c.client_id,
                username,
                password,
                clean_session: c.clean_session,
                keep_alive: c.keep_alive,
                has_will: c.last_will.is_some(),
            })
        }
        Packet::Publish(p) => ClientPacket::Publish(Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            dup: p.dup,
            retain: p.retain,
            pkid: p.pkid,
        }),
        Packet::PubAck(a) => ClientPacket::PubAck(a.pkid),
        Packet::Subscribe(s) => ClientPacket::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        }),
        Packet::Unsubscribe(u) => ClientPacket::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        }),
        Packet::PingReq => ClientPacket::PingReq,
        Packet::Disconnect => ClientPacket::Disconnect,
        Packet::ConnAck(_) => ClientPacket::Unexpected("CONNACK"),
        Packet::PubRec(_) => ClientPacket::Unexpected("PUBREC"),
        Packet::PubRel(_) => ClientPacket::Unexpected("PUBREL"),
        Packet::PubComp(_) => ClientPacket::Unexpected("PUBCOMP"),
        Packet::SubAck(_) => ClientPacket::Unexpected("SUBACK"),
        Packet::UnsubAck(_) => ClientPacket::Unexpected("UNSUBACK"),
        Packet::PingResp => ClientPacket::Unexpected("PINGRESP"),
    }))
}

/// Appends one server packet to `buf`.
pub(crate) fn encode_server(packet: &ServerPacket, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let packet = match packet {
        ServerPacket::ConnAck {
            session_present,
            code,
        } => Packet::ConnAck(wire::ConnAck::new(connack_code(*code)?, *session_present)),
        ServerPacket::Publish(p) => Packet::Publish(to_wire_publish(p)?),
        ServerPacket::PubAck(pkid) => Packet::PubAck(wire::PubAck::new(*pkid)),
        ServerPacket::SubAck { pkid, codes } => {
            let codes = codes
                .iter()
                .map(|code| match code {
                    0 => Ok(wire::SubscribeReasonCode::Success(
                        mqttbytes::QoS::AtMostOnce,
                    )),
                    1 => Ok(wire::SubscribeReasonCode::Success(
                        mqttbytes::QoS::AtLeastOnce,
                    )),
                    0x80 => Ok(wire::SubscribeReasonCode::Failure),
                    other => Err(EncodeError(format!("SUBACK code {other}"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Packet::SubAck(wire::SubAck::new(*pkid, codes))
        }
        ServerPacket::UnsubAck(pkid) => Packet::UnsubAck(wire::UnsubAck::new(*pkid)),
        ServerPacket::PingResp => Packet::PingResp,
    };
    write(&packet, buf)
}

/// Whether `topic` can be put on the wire as a PUBLISH topic name (the codec's length prefix is
/// 16 bits).
pub(crate) fn encodable_topic(topic: &str) -> bool {
    topic.len() <= usize::from(u16::MAX)
}

fn write(packet: &Packet, buf: &mut BytesMut) -> Result<(), EncodeError> {
    // MQTT's remaining length tops out at 268,435,455 bytes; the codec checks that too.
    packet
        .write(buf, 268_435_460)
        .map(|_| ())
        .map_err(|e| EncodeError(e.to_string()))
}

fn to_wire_publish(p: &Publish) -> Result<wire::Publish, EncodeError> {
    if !encodable_topic(&p.topic) {
        return Err(EncodeError("topic longer than 65535 bytes".into()));
    }
    let qos = match p.qos {
        0 => mqttbytes::QoS::AtMostOnce,
        1 => mqttbytes::QoS::AtLeastOnce,
        2 => mqttbytes::QoS::ExactlyOnce,
        other => return Err(EncodeError(format!("QoS {other}"))),
    };
    let mut publish = wire::Publish::from_bytes(p.topic.clone(), qos, p.payload.clone());
    publish.dup = p.dup;
    publish.retain = p.retain;
    publish.pkid = p.pkid;
    Ok(publish)
}

fn connack_code(code: u8) -> Result<wire::ConnectReturnCode, EncodeError> {
    use wire::ConnectReturnCode as C;
    Ok(match code {
        0 => C::Success,
        1 => C::RefusedProtocolVersion,
        2 => C::BadClientId,
        3 => C::ServiceUnavailable,
        4 => C::BadUserNamePassword,
        5 => C::NotAuthorized,
        other => return Err(EncodeError(format!("CONNACK code {other}"))),
    })
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// Protocol name and level of a complete CONNECT frame.
fn connect_protocol(frame: &[u8]) -> Option<(String, u8)> {
    // Skip the first byte and the 1–4 byte remaining length.
    let mut at = 1;
    loop {
        let byte = *frame.get(at)?;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return None;
        }
    }
    let len = usize::from(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    at += 2;
    let name = frame.get(at..at + len)?;
    let level = *frame.get(at + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), level))
}

/// The client side of the codec, for the engine's tests.
#[cfg(test)]
pub(crate) mod client {
    use super::*;

    /// A CONNECT as the test client sends it.
    pub(crate) fn encode_connect(connect: &Connect, buf: &mut BytesMut) {
        let mut c = wire::Connect::new(connect.client_id.clone());
        c.clean_session = connect.clean_session;
        c.keep_alive = connect.keep_alive;
        if connect.username.is_some() || connect.password.is_some() {
            c.set_login(
                connect.username.clone().unwrap_or_default(),
                connect.password.clone().unwrap_or_default(),
            );
        }
        write(&Packet::Connect(c), buf).unwrap();
    }

    pub(crate) fn encode(packet: &ClientPacket, buf: &mut BytesMut) {
        let packet = match packet {
            ClientPacket::Connect(c) => return encode_connect(c, buf),
            ClientPacket::Publish(p) => Packet::Publish(to_wire_publish(p).unwrap()),
            ClientPacket::PubAck(pkid) => Packet::PubAck(wire::PubAck::new(*pkid)),
            ClientPacket::Subscribe(s) => {
                let mut subscribe = wire::Subscribe::new_many(s.filters.iter().map(|(f, q)| {
                    wire::SubscribeFilter::new(f.clone(), mqttbytes::qos(*q).unwrap())
                }));
                subscribe.pkid = s.pkid;
                Packet::Subscribe(subscribe)
            }
            ClientPacket::Unsubscribe(u) => Packet::Unsubscribe(wire::Unsubscribe {
                pkid: u.pkid,
                topics: u.filters.clone(),
            }),
            ClientPacket::PingReq => Packet::PingReq,
            ClientPacket::Disconnect => Packet::Disconnect,
            ClientPacket::Unexpected(_) => panic!("cannot encode an unexpected packet"),
        };
        write(&packet, buf).unwrap();
    }

    /// Takes one server packet off `buf`; `Ok(None)` when more bytes are needed.
    pub(crate) fn decode(buf: &mut BytesMut) -> Result<Option<ServerPacket>, String> {
        match Packet::read(buf, 16 * 1024 * 1024) {
            Ok(packet) => Ok(Some(match packet {
                Packet::ConnAck(c) => ServerPacket::ConnAck {
                    session_present: c.session_present,
                    code: c.code as u8,
                },
                Packet::Publish(p) => ServerPacket::Publish(Publish {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    dup: p.dup,
                    retain: p.retain,
                    pkid: p.pkid,
                }),
                Packet::PubAck(a) => ServerPacket::PubAck(a.pkid),
                Packet::SubAck(s) => ServerPacket::SubAck {
                    pkid: s.pkid,
                    codes: s
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            wire::SubscribeReasonCode::Success(q) => *q as u8,
                            wire::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect(),
                },
                Packet::UnsubAck(u) => ServerPacket::UnsubAck(u.pkid),
                Packet::PingResp => ServerPacket::PingResp,
                other => return Err(format!("a server does not send {other:?}")),
            })),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn decode_all(bytes: &[u8], max: usize) -> Vec<Result<Option<ClientPacket>, DecodeError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            let r = decode_client(&mut buf, max);
            let stop = !matches!(r, Ok(Some(_)));
            out.push(r);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn connect_round_trip_and_password_is_not_printed() {
        let connect = Connect {
            client_id: "dev1".into(),
            username: Some("hub/dev1/?api-version=2019-10-01".into()),
            password: Some("SharedAccessSignature sr=x&sig=secret&se=1".into()),
            clean_session: false,
            keep_alive: 60,
            has_will: false,
        };
        let mut buf = BytesMut::new();
        client::encode_connect(&connect, &mut buf);
        let decoded = decode_client(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(decoded, ClientPacket::Connect(connect));
        assert!(buf.is_empty());
        let printed = format!("{decoded:?}");
        assert!(!printed.contains("secret"), "{printed}");
    }

    #[test]
    fn other_protocol_levels_are_unsupported() {
        // MQTT 3.1: "MQIsdp", level 3.
        let mqtt31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0,
        ];
        assert!(matches!(
            decode_client(&mut BytesMut::from(&mqtt31[..]), 1024),
            Err(DecodeError::UnsupportedProtocol { level: 3, .. })
        ));
        // MQTT 5 with an empty property list.
        let mqtt5 = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 0];
        assert!(matches!(
            decode_client(&mut BytesMut::from(&mqtt5[..]), 1024),
            Err(DecodeError::UnsupportedProtocol { level: 5, .. })
        ));
        let unknown = [0x10, 12, 0, 4, b'A', b'B', b'C', b'D', 4, 2, 0, 60, 0, 0];
        assert!(matches!(
            decode_client(&mut BytesMut::from(&unknown[..]), 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn oversize_is_refused_from_the_header() {
        // PUBLISH announcing 300,000 bytes; only the header has arrived.
        let header = [0x30, 0xE0, 0xA7, 0x12];
        assert_eq!(
            decode_client(&mut BytesMut::from(&header[..]), 1024),
            Err(DecodeError::TooLarge(300_000))
        );
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut buf = BytesMut::new();
        client::encode(
            &ClientPacket::Subscribe(Subscribe {
                pkid: 7,
                filters: vec![("a/#".into(), 1)],
            }),
            &mut buf,
        );
        let full = buf.clone();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode_client(&mut part, 1024), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn server_packets_encode() {
        let mut buf = BytesMut::new();
        for packet in [
            ServerPacket::ConnAck {
                session_present: true,
                code: 0,
            },
            ServerPacket::SubAck {
                pkid: 3,
                codes: vec![1, 0x80, 0],
            },
            ServerPacket::UnsubAck(4),
            ServerPacket::PubAck(5),
            ServerPacket::PingResp,
            ServerPacket::Publish(Publish {
                topic: "$iothub/twin/res/200/?$rid=1".into(),
                payload: Bytes::from_static(b"{}"),
                qos: 1,
                dup: true,
                retain: false,
                pkid: 9,
            }),
        ] {
            encode_server(&packet, &mut buf).unwrap();
            assert_eq!(client::decode(&mut buf).unwrap(), Some(packet));
            assert!(buf.is_empty());
        }
        assert!(
            encode_server(
                &ServerPacket::ConnAck {
                    session_present: false,
                    code: 9
                },
                &mut buf
            )
            .is_err()
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..20_000 {
            let len = rng.gen_range(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            // Bias towards plausible headers so that the body parsers get exercised too.
            if let Some(first) = bytes.first_mut() {
                *first = (rng.gen_range(0..16u8) << 4) | (*first & 0x0F);
            }
            if round % 2 == 0 && bytes.len() > 1 {
                bytes[1] = (len - 2) as u8 & 0x7F;
            }
            let _ = decode_all(&bytes, 1024);
        }
    }

    #[test]
    fn garbage_types_are_refused_from_the_first_byte() {
        for first in [0x00u8, 0x20, 0x90, 0xB0, 0xD0, 0xF0] {
            let mut buf = BytesMut::from(&[first, 0xff, 0xff, 0x7f][..]);
            assert!(
                matches!(
                    decode_client(&mut buf, 1024),
                    Err(DecodeError::Malformed(_))
                ),
                "{first:#x}"
            );
        }
    }
}
