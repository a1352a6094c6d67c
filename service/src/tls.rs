//! TLS for the listeners: rustls for MQTT and HTTPS (decisions 49, 51), openssl for AMQP. Both give
//! TLS 1.2 and 1.3, the server chain from the data dir, and client certificates requested but
//! never required. Whatever the client presents is let through the handshake and handed to the
//! application, which decides (device attestation judges certificates itself; the management
//! API ignores them).

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use actix_web::dev::Extensions;
use anyhow::Context;
use base64::Engine;
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslMode, SslVerifyMode, SslVersion};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, PeerMisbehaved, SignatureScheme,
};

/// The client's certificates as presented on one connection, DER encoded.
#[derive(Debug, Clone)]
pub struct PeerCertificates {
    pub leaf: Vec<u8>,
    /// Certificates the client sent after its leaf (intermediates), in order.
    pub chain: Vec<Vec<u8>>,
}

impl PeerCertificates {
    pub fn leaf_pem(&self) -> String {
        pem_of(&self.leaf)
    }

    /// Whether openssl chains the leaf, through the intermediates sent, to a certificate of
    /// `bundle_pem` (informational: nothing is accepted or refused by it).
    pub fn chains_to(&self, bundle_pem: &[u8]) -> bool {
        let verified = || -> Result<bool, openssl::error::ErrorStack> {
            let mut store = openssl::x509::store::X509StoreBuilder::new()?;
            for root in openssl::x509::X509::stack_from_pem(bundle_pem)? {
                store.add_cert(root)?;
            }
            let store = store.build();
            let mut chain = openssl::stack::Stack::new()?;
            for der in &self.chain {
                chain.push(openssl::x509::X509::from_der(der)?)?;
            }
            let leaf = openssl::x509::X509::from_der(&self.leaf)?;
            let mut context = openssl::x509::X509StoreContext::new()?;
            context.init(&store, &leaf, &chain, |c| c.verify_cert())
        };
        verified().unwrap_or(false)
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

/// The openssl acceptor of the AMQP listener, with the policy of [`rustls_config`].
pub fn acceptor(chain: &Path, key: &Path) -> anyhow::Result<SslAcceptor> {
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
    builder.set_session_id_context(b"zerotouch")?;
    // An idle connection gives its 16 KiB+ read and write record buffers back to the allocator
    // (openssl takes them again on the next record): ~19 KiB less per idle device connection,
    // measured with `scripts/bench --scenarios idle` (docs/performance.md).
    builder.set_mode(SslMode::RELEASE_BUFFERS);
    // PEER without FAIL_IF_NO_PEER_CERT: request a certificate, never require one; the callback
    // accepts any chain (self-signed device certificates included) for the application to judge.
    // No CA store: nothing reads whether the chain reaches ours, so openssl builds none.
    builder.set_verify_callback(SslVerifyMode::PEER, |_preverified, _ctx| true);
    Ok(builder.build())
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
    Some(PeerCertificates { leaf, chain })
}

/// TLS for the MQTT listener (rustls on ring, decision 49): see [`rustls_config`].
pub fn mqtt_acceptor(chain: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(rustls_config(
        chain, key, "MQTT",
    )?)))
}

/// TLS for the HTTPS listener (decision 51): [`rustls_config`] with ALPN for HTTP/2 and 1.1.
pub fn https_config(chain: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let mut config = rustls_config(chain, key, "HTTPS")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The rustls server side (on ring) of the MQTT and HTTPS listeners: the server chain and key
/// of the data dir, TLS 1.2 and 1.3, client certificates requested and never required, any
/// chain let through for the application to judge (as [`acceptor`] does for AMQP), session
/// tickets for resumption. About half of openssl's memory per idle connection, and a cheaper
/// handshake than openssl 3.0's.
fn rustls_config(chain: &Path, key: &Path, listener: &str) -> anyhow::Result<rustls::ServerConfig> {
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
        .with_context(|| format!("using the server certificate and key for {listener}"))?;
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().context("creating the session ticket keys")?;
    Ok(config)
}

/// Lets any client certificate through the handshake (as openssl's accept-all callback does for
/// [`acceptor`]); the client must still prove it holds the certificate's key.
#[derive(Debug)]
struct AnyClientCertificate {
    /// ring's, through webpki: the handshake signature is checked with these first.
    algorithms: WebPkiSupportedAlgorithms,
}

/// What the client may sign its handshake with, in the order offered.
const CLIENT_SIGNATURE_SCHEMES: [SignatureScheme; 10] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
];

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
            .or_else(|_| verify_handshake_signature(message, certificate, signature, false))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
            .or_else(|_| verify_handshake_signature(message, certificate, signature, true))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        CLIENT_SIGNATURE_SCHEMES.to_vec()
    }
}

/// Checks the client's handshake signature with openssl, where webpki (rustls's own check on
/// ring, tried first: a fifth of openssl 3.0's cost, which parses the certificate and decodes
/// its key through provider look-ups) did not accept it. So every certificate the openssl
/// listeners take works here too: webpki refuses X.509 v1 certificates, P-521 keys and RSA
/// keys under 2048 bits. A bad signature is refused by both. TLS 1.3 binds an ECDSA scheme to its curve and
/// has no PKCS#1 v1.5 signatures (RFC 8446 §4.2.3); TLS 1.2 does neither.
fn verify_handshake_signature(
    message: &[u8],
    certificate: &CertificateDer<'_>,
    signature: &DigitallySignedStruct,
    tls13: bool,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::sign::{RsaPssSaltlen, Verifier};

    let bad_signature = || rustls::Error::InvalidCertificate(CertificateError::BadSignature);
    let key = openssl::x509::X509::from_der(certificate)
        .and_then(|certificate| certificate.public_key())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let unadvertised =
        || rustls::Error::PeerMisbehaved(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme);
    // (digest, RSA-PSS, the curve TLS 1.3 requires)
    let (digest, pss, curve) = match signature.scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256 => (
            Some(MessageDigest::sha256()),
            false,
            Some(Nid::X9_62_PRIME256V1),
        ),
        SignatureScheme::ECDSA_NISTP384_SHA384 => {
            (Some(MessageDigest::sha384()), false, Some(Nid::SECP384R1))
        }
        SignatureScheme::ECDSA_NISTP521_SHA512 => {
            (Some(MessageDigest::sha512()), false, Some(Nid::SECP521R1))
        }
        SignatureScheme::ED25519 => (None, false, None),
        SignatureScheme::RSA_PSS_SHA256 => (Some(MessageDigest::sha256()), true, None),
        SignatureScheme::RSA_PSS_SHA384 => (Some(MessageDigest::sha384()), true, None),
        SignatureScheme::RSA_PSS_SHA512 => (Some(MessageDigest::sha512()), true, None),
        SignatureScheme::RSA_PKCS1_SHA256 if !tls13 => (Some(MessageDigest::sha256()), false, None),
        SignatureScheme::RSA_PKCS1_SHA384 if !tls13 => (Some(MessageDigest::sha384()), false, None),
        SignatureScheme::RSA_PKCS1_SHA512 if !tls13 => (Some(MessageDigest::sha512()), false, None),
        _ => return Err(unadvertised()),
    };
    if let (true, Some(curve)) = (tls13, curve) {
        let key_curve = key.ec_key().ok().and_then(|ec| ec.group().curve_name());
        if key_curve != Some(curve) {
            return Err(bad_signature());
        }
    }
    let verified = (|| {
        let mut verifier = match digest {
            Some(digest) => Verifier::new(digest, &key)?,
            None => Verifier::new_without_digest(&key)?,
        };
        if pss {
            verifier.set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)?;
            verifier.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
        }
        verifier.verify_oneshot(signature.signature(), message)
    })();
    match verified {
        Ok(true) => Ok(HandshakeSignatureValid::assertion()),
        _ => Err(bad_signature()),
    }
}

/// The client's certificates on a connection of a rustls listener (MQTT, HTTPS).
pub fn rustls_peer_certificates(connection: &rustls::ServerConnection) -> Option<PeerCertificates> {
    let (leaf, chain) = connection.peer_certificates()?.split_first()?;
    Some(PeerCertificates {
        leaf: leaf.to_vec(),
        chain: chain.iter().map(|c| c.to_vec()).collect(),
    })
}

/// actix `on_connect` hook: stores the peer certificates in the connection's extensions.
pub fn on_connect(connection: &dyn Any, extensions: &mut Extensions) {
    type Stream = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = connection.downcast_ref::<Stream>()
        && let Some(peer) = rustls_peer_certificates(tls.get_ref().1)
    {
        extensions.insert(peer);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::{PKey, Private};
    use openssl::sign::Signer;
    use rustls::internal::msgs::codec::{Codec, Reader};

    use super::*;

    fn ec_key(curve: Nid) -> PKey<Private> {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(curve).unwrap()).unwrap())
            .unwrap()
    }

    /// A self-signed certificate made with openssl (so that RSA and P-521 are covered too), as
    /// X.509 v3 or v1.
    pub(crate) fn self_signed(key: &PKey<Private>, cn: &str, v3: bool) -> openssl::x509::X509 {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut cert = openssl::x509::X509::builder().unwrap();
        cert.set_version(if v3 { 2 } else { 0 }).unwrap();
        cert.set_subject_name(&name).unwrap();
        cert.set_issuer_name(&name).unwrap();
        cert.set_pubkey(key).unwrap();
        let serial = openssl::bn::BigNum::from_u32(7)
            .unwrap()
            .to_asn1_integer()
            .unwrap();
        cert.set_serial_number(&serial).unwrap();
        cert.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        cert.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        cert.sign(key, MessageDigest::sha256()).unwrap();
        cert.build()
    }

    fn certificate(key: &PKey<Private>) -> CertificateDer<'static> {
        CertificateDer::from(self_signed(key, "device", true).to_der().unwrap())
    }

    /// A handshake signature as a client sends it: scheme, then the signature.
    fn signed(scheme: SignatureScheme, signature: &[u8]) -> DigitallySignedStruct {
        let mut bytes = Vec::new();
        scheme.encode(&mut bytes);
        bytes.extend_from_slice(&u16::try_from(signature.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(signature);
        DigitallySignedStruct::read(&mut Reader::init(&bytes)).unwrap()
    }

    fn sign(key: &PKey<Private>, digest: MessageDigest, message: &[u8]) -> Vec<u8> {
        let mut signer = Signer::new(digest, key).unwrap();
        signer.sign_oneshot_to_vec(message).unwrap()
    }

    /// Through the verifier the listeners use: webpki on ring first, then openssl.
    fn verify(
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
        tls13: bool,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        #[expect(deprecated, reason = "ring has no post-quantum key exchange")]
        let verifier = AnyClientCertificate {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        };
        if tls13 {
            verifier.verify_tls13_signature(message, certificate, signature)
        } else {
            verifier.verify_tls12_signature(message, certificate, signature)
        }
    }

    #[test]
    fn the_client_must_sign_with_its_certificates_key() {
        let message = b"the handshake so far";
        let p256 = ec_key(Nid::X9_62_PRIME256V1);
        let other = ec_key(Nid::X9_62_PRIME256V1);
        let p384 = ec_key(Nid::SECP384R1);
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let good = signed(
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &sign(&p256, MessageDigest::sha256(), message),
        );
        let p256_cert = certificate(&p256);
        for tls13 in [false, true] {
            assert!(verify(message, &p256_cert, &good, tls13).is_ok());
            // Another message, another key's certificate: refused.
            assert!(verify(b"another", &p256_cert, &good, tls13).is_err());
            let other_cert = certificate(&other);
            assert!(verify(message, &other_cert, &good, tls13).is_err());
        }

        // TLS 1.3 binds the ECDSA scheme to the curve; TLS 1.2 does not.
        let p384_as_p256 = signed(
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &sign(&p384, MessageDigest::sha256(), message),
        );
        let p384_cert = certificate(&p384);
        assert!(verify(message, &p384_cert, &p384_as_p256, false).is_ok());
        assert!(verify(message, &p384_cert, &p384_as_p256, true).is_err());

        // RSA PKCS#1 v1.5 only in TLS 1.2; PSS in both.
        let rsa_cert = certificate(&rsa);
        let pkcs1 = signed(
            SignatureScheme::RSA_PKCS1_SHA256,
            &sign(&rsa, MessageDigest::sha256(), message),
        );
        assert!(verify(message, &rsa_cert, &pkcs1, false).is_ok());
        assert!(verify(message, &rsa_cert, &pkcs1, true).is_err());
        let mut signer = Signer::new(MessageDigest::sha256(), &rsa).unwrap();
        signer
            .set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)
            .unwrap();
        signer
            .set_rsa_pss_saltlen(openssl::sign::RsaPssSaltlen::DIGEST_LENGTH)
            .unwrap();
        let pss = signed(
            SignatureScheme::RSA_PSS_SHA256,
            &signer.sign_oneshot_to_vec(message).unwrap(),
        );
        for tls13 in [false, true] {
            assert!(verify(message, &rsa_cert, &pss, tls13).is_ok());
            // The PKCS#1 signature under the PSS scheme, and the other way round: refused.
            let mislabelled = signed(SignatureScheme::RSA_PSS_SHA256, pkcs1.signature());
            assert!(verify(message, &rsa_cert, &mislabelled, tls13).is_err());
        }
        // A scheme not offered, and a certificate that is not DER.
        let sha1 = signed(SignatureScheme::RSA_PKCS1_SHA1, pkcs1.signature());
        assert!(verify(message, &rsa_cert, &sha1, false).is_err());
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(verify(message, &garbage, &good, false).is_err());

        // What webpki refuses to parse or verify, openssl checks: a P-521 key, an X.509 v1
        // certificate, an RSA key under 2048 bits. Right key: accepted; another: refused.
        let p521 = ec_key(Nid::SECP521R1);
        let p521_signed = signed(
            SignatureScheme::ECDSA_NISTP521_SHA512,
            &sign(&p521, MessageDigest::sha512(), message),
        );
        let p521_v1 = CertificateDer::from(self_signed(&p521, "device", false).to_der().unwrap());
        let other_p521 = CertificateDer::from(
            self_signed(&ec_key(Nid::SECP521R1), "device", false)
                .to_der()
                .unwrap(),
        );
        let p256_v1 = CertificateDer::from(self_signed(&p256, "device", false).to_der().unwrap());
        for tls13 in [false, true] {
            assert!(verify(message, &p521_v1, &p521_signed, tls13).is_ok());
            assert!(verify(message, &other_p521, &p521_signed, tls13).is_err());
            assert!(verify(message, &p256_v1, &good, tls13).is_ok());
            assert!(verify(b"another", &p256_v1, &good, tls13).is_err());
        }
        let rsa1024 = PKey::from_rsa(openssl::rsa::Rsa::generate(1024).unwrap()).unwrap();
        let small = signed(
            SignatureScheme::RSA_PKCS1_SHA256,
            &sign(&rsa1024, MessageDigest::sha256(), message),
        );
        assert!(verify(message, &certificate(&rsa1024), &small, false).is_ok());
        assert!(verify(message, &rsa_cert, &small, false).is_err());
    }
}
