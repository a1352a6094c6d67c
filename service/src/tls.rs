//! TLS for both listeners (openssl): TLS 1.2 and 1.3, the server chain from the data dir, and
//! client certificates requested but never required. Whatever the client presents is let
//! through the handshake and handed to the application, which decides (device attestation
//! judges certificates itself; the management API ignores them).

use std::any::Any;
use std::path::Path;

use actix_web::dev::Extensions;
use anyhow::Context;
use base64::Engine;
use openssl::ssl::{
    SslAcceptor, SslAcceptorBuilder, SslFiletype, SslMethod, SslMode, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;

/// The client's certificates as presented on one connection, DER encoded.
#[derive(Debug, Clone)]
pub struct PeerCertificates {
    pub leaf: Vec<u8>,
    /// Certificates the client sent after its leaf (intermediates), in order.
    pub chain: Vec<Vec<u8>>,
    /// Whether openssl could chain the leaf to the service's own CA (informational only).
    pub verified_by_server_ca: bool,
}

impl PeerCertificates {
    pub fn leaf_pem(&self) -> String {
        pem_of(&self.leaf)
    }
}

fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// An acceptor builder with our policy; callers may add ALPN before building.
pub fn acceptor(chain: &Path, key: &Path, ca_bundle: &Path) -> anyhow::Result<SslAcceptorBuilder> {
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .context("creating the TLS context")?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    builder
        .set_certificate_chain_file(chain)
        .with_context(|| format!("loading {}", chain.display()))?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .with_context(|| format!("loading {}", key.display()))?;
    builder
        .check_private_key()
        .context("the server key does not match its certificate")?;
    // Lets openssl report whether a client chain reaches our CA; acceptance is the app's call.
    builder
        .set_ca_file(ca_bundle)
        .with_context(|| format!("loading {}", ca_bundle.display()))?;
    builder.set_session_id_context(b"zerotouch")?;
    // An idle connection gives its 16 KiB+ read and write record buffers back to the allocator
    // (openssl takes them again on the next record): ~19 KiB less per idle device connection,
    // measured with `scripts/bench --scenarios idle` (docs/performance.md).
    builder.set_mode(SslMode::RELEASE_BUFFERS);
    // PEER without FAIL_IF_NO_PEER_CERT: request a certificate, never require one; the callback
    // accepts any chain (self-signed device certificates included) for the application to judge.
    builder.set_verify_callback(SslVerifyMode::PEER, |_preverified, _ctx| true);
    Ok(builder)
}

/// Reads the peer certificates off an openssl session.
pub fn peer_certificates(ssl: &openssl::ssl::SslRef) -> Option<PeerCertificates> {
    let leaf = ssl.peer_certificate()?.to_der().ok()?;
    // On the server side the peer chain excludes the leaf.
    let chain = ssl
        .peer_cert_chain()
        .map(|stack| {
            stack
                .iter()
                .filter_map(|c| c.to_der().ok())
                .filter(|d| *d != leaf)
                .collect()
        })
        .unwrap_or_default();
    Some(PeerCertificates {
        leaf,
        chain,
        verified_by_server_ca: ssl.verify_result() == X509VerifyResult::OK,
    })
}

/// actix `on_connect` hook: stores the peer certificates in the connection's extensions.
pub fn on_connect(connection: &dyn Any, extensions: &mut Extensions) {
    type Stream = actix_tls::accept::openssl::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = connection.downcast_ref::<Stream>()
        && let Some(peer) = peer_certificates(tls.ssl())
    {
        extensions.insert(peer);
    }
}
