//! MQTT client pieces shared by `zerotouch simulate` and `hub_load`: TLS connectors trusting
//! only the server's CA bundle, and short names for client-side connection errors.

use std::time::Instant;

use rumqttc::tokio_native_tls::native_tls;
use rumqttc::{ConnectionError, Event, EventLoop, Packet, StateError};
use tokio::sync::Semaphore;

/// A native-tls connector that trusts exactly the certificates of `ca_pem` (no system store:
/// loading it for each of thousands of connectors would dominate setup), optionally presenting
/// `identity` (PEM certificate chain, PKCS#8 PEM key). `tls12_only` caps the protocol at TLS 1.2,
/// as the Python device SDK does.
pub fn connector(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    tls12_only: bool,
) -> anyhow::Result<native_tls::TlsConnector> {
    let mut builder = native_tls::TlsConnector::builder();
    builder.disable_built_in_roots(true);
    for cert in openssl::x509::X509::stack_from_pem(ca_pem)? {
        builder.add_root_certificate(native_tls::Certificate::from_der(&cert.to_der()?)?);
    }
    if let Some((chain, key)) = identity {
        builder.identity(native_tls::Identity::from_pkcs8(chain, key)?);
    }
    if tls12_only {
        builder.max_protocol_version(Some(native_tls::Protocol::Tlsv12));
    }
    Ok(builder.build()?)
}

/// Polls a new client's event loop up to its CONNACK while holding a permit of `gate` (which
/// bounds the TLS handshakes in flight). Returns the connect latency in ms (TCP + TLS + CONNACK,
/// after the permit), or an error kind such as `{prefix}:connack:NotAuthorized`.
pub async fn connect(
    eventloop: &mut EventLoop,
    gate: &Semaphore,
    prefix: &str,
) -> Result<f64, String> {
    let _permit = gate.acquire().await;
    let started = Instant::now();
    match eventloop.poll().await {
        Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(started.elapsed().as_secs_f64() * 1000.0),
        Ok(_) => Err(format!("{prefix}:unexpected_event")),
        Err(e) => Err(format!("{prefix}:{}", connection_error_kind(&e))),
    }
}

/// `connack:NotAuthorized`, `io:ConnectionRefused`, `tls`, …
pub fn connection_error_kind(e: &ConnectionError) -> String {
    match e {
        ConnectionError::MqttState(s) => format!("mqtt_state:{}", state_error_kind(s)),
        ConnectionError::NetworkTimeout => "network_timeout".into(),
        ConnectionError::FlushTimeout => "flush_timeout".into(),
        ConnectionError::Tls(_) => "tls".into(),
        ConnectionError::Io(io) => format!("io:{:?}", io.kind()),
        ConnectionError::ConnectionRefused(code) => format!("connack:{code:?}"),
        ConnectionError::NotConnAck(_) => "not_connack".into(),
        ConnectionError::RequestsDone => "requests_done".into(),
    }
}

fn state_error_kind(e: &StateError) -> &'static str {
    use rumqttc::StateError as S;
    match e {
        S::Io(_) => "io",
        S::InvalidState => "invalid_state",
        S::Unsolicited(_) => "unsolicited_ack",
        S::AwaitPingResp => "no_pingresp",
        S::WrongPacket => "wrong_packet",
        S::CollisionTimeout => "collision_timeout",
        S::EmptySubscription => "empty_subscription",
        S::Deserialization(_) => "deserialization",
        S::ConnectionAborted => "aborted_by_peer",
    }
}

/// The value of `key` in a topic's query part (`…/?$rid=7&retry-after=1`).
pub fn topic_query_value<'a>(topic: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = topic.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// The status of a response topic: `$dps/registrations/res/202/?…` or `$iothub/twin/res/204/?…`.
pub fn response_status(topic: &str, prefix: &str) -> Option<u16> {
    topic.strip_prefix(prefix)?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics() {
        let topic = "$dps/registrations/res/202/?$rid=7&retry-after=3";
        assert_eq!(response_status(topic, "$dps/registrations/res/"), Some(202));
        assert_eq!(topic_query_value(topic, "$rid"), Some("7"));
        assert_eq!(topic_query_value(topic, "retry-after"), Some("3"));
        assert_eq!(topic_query_value(topic, "x"), None);
        assert_eq!(
            response_status(
                "$iothub/twin/res/204/?$rid=1&$version=4",
                "$iothub/twin/res/"
            ),
            Some(204)
        );
        assert_eq!(response_status("devices/x", "$iothub/twin/res/"), None);
    }
}
