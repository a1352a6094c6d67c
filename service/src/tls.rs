//! TLS for the listeners: openssl for HTTPS and AMQP, rustls for MQTT (decision 49). Both give
//! TLS 1.2 and 1.3, the server chain from the data dir, and client certificates requested but
//! never required. Whatever the client presents is let
//! through the handshake and handed to the application, which decides (device attestation
//! judges certificates itself; the management API ignores them).

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use actix_web::dev::Extensions;
use anyhow::Context;
use base64::Engine;
use openssl::ssl::{
    SslAcceptor, SslAcceptorBuilder, SslFiletype, SslMethod, SslMode, SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The client's certificates as presented on one connection, DER encoded.
#[derive(Debug, Clone)]
pub struct PeerCertificates {
    pub leaf: Vec<u8>,
    /// Certificates the client sent after its leaf (intermediates), in order.
    pub chain: Vec<Vec<u8>>,
    /// Whether openssl could chain the leaf to the service's own CA (informational only; HTTPS
    /// only, `None` on MQTT).
    pub verified_by_server_ca: Option<bool>,
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
        verified_by_server_ca: Some(ssl.verify_result() == X509VerifyResult::OK),
    })
}

/// TLS for the MQTT listener (rustls on ring, decision 49): the same server chain and key and
/// the same policy as [`acceptor`] (TLS 1.2 and 1.3, client certificates requested, never
/// required, any chain let through for the application to judge), with about half of
/// openssl's memory per idle connection. Session tickets let devices resume.
pub fn mqtt_acceptor(chain: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    // Deprecated only for lacking post-quantum key exchange, which openssl 3.0 on the other
    // listeners lacks as well; aws-lc (the other provider) would add a C build of its own.
    #[expect(deprecated, reason = "ring has no post-quantum key exchange")]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = CertificateDer::pem_file_iter(chain)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("loading {}", chain.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("loading {}", key.display()))?;
    let verifier = Arc::new(AnyClientCertificate {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("creating the TLS context")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates, key)
        .context("the server key does not fit its certificate")?;
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().context("creating the session ticket keys")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Lets any client certificate through the handshake (as openssl's accept-all callback does for
/// [`acceptor`]); the client must still prove it holds the certificate's key.
#[derive(Debug)]
struct AnyClientCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client's certificates on a connection of the MQTT listener. `verified_by_server_ca` is
/// `None`: this listener does not chain them to our CA (the hub and DPS judge them).
pub fn mqtt_peer_certificates(connection: &rustls::ServerConnection) -> Option<PeerCertificates> {
    let (leaf, chain) = connection.peer_certificates()?.split_first()?;
    Some(PeerCertificates {
        leaf: leaf.to_vec(),
        chain: chain.iter().map(|c| c.to_vec()).collect(),
        verified_by_server_ca: None,
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
