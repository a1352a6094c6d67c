//! The device MQTT listener (TLS, port 8883 by default).
//!
//! For now it completes the TLS handshake (so certificates and ports can be checked end to end)
//! and closes the connection. The DPS and hub issues fill in MQTT 3.1.1.

use std::net::SocketAddr;
use std::pin::Pin;

use openssl::ssl::{Ssl, SslAcceptor};
use tokio::net::TcpListener;
use tokio_openssl::SslStream;

/// Binds and starts accepting on the current actix/tokio runtime. Returns the bound address.
pub async fn start(addr: SocketAddr, acceptor: SslAcceptor) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    actix_web::rt::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("MQTT accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ssl = match Ssl::new(acceptor.context()) {
                Ok(ssl) => ssl,
                Err(e) => {
                    tracing::error!("creating a TLS session failed: {e}");
                    continue;
                }
            };
            actix_web::rt::spawn(async move {
                let Ok(mut tls) = SslStream::new(ssl, stream) else {
                    return;
                };
                let handshake = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    Pin::new(&mut tls).accept(),
                )
                .await;
                match handshake {
                    Ok(Ok(())) => {
                        tracing::debug!(%peer, "MQTT TLS session opened; MQTT is not served yet, closing")
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "MQTT TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "MQTT TLS handshake timed out"),
                }
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            });
        }
    });
    Ok(bound)
}

/// Placeholder until the MQTT engine lands: a handle to a connection that never exists.
#[derive(Clone)]
pub struct Outbound;
