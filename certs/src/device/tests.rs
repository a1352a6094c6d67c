use std::time::Duration as StdDuration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension,
    DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType, SignatureAlgorithm,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{ALL_VERIFICATION_ALGS, EndEntityCert, KeyUsage, anchor_from_trusted_cert};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::pem::Pem;

use crate::{CaHierarchy, Error};

const DEVICE: &str = "dev-01";
/// subjectKeyIdentifier, which rcgen's CSR parser does not know.
const OID_SUBJECT_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 14];

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn der_of(pem_text: &str) -> Vec<u8> {
    Pem::iter_from_buffer(pem_text.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn csr_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p
}

fn csr_with(alg: &'static SignatureAlgorithm, p: &CertificateParams) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate_for(alg).unwrap();
    let der = p.serialize_request(&key).unwrap().der().to_vec();
    (der, key)
}

fn csr(cn: &str) -> Vec<u8> {
    csr_with(&PKCS_ECDSA_P256_SHA256, &csr_params(cn)).0
}

/// Validates the issued chain with rustls-webpki: the root as the only trust anchor, the
/// intermediate from the chain, at `at` (Unix seconds).
fn webpki_verify(chain: &[Vec<u8>], usage: KeyUsage, at: i64) -> Result<(), webpki::Error> {
    let root = CertificateDer::from(chain[2].as_slice());
    let anchors = [anchor_from_trusted_cert(&root).unwrap()];
    let intermediates = [CertificateDer::from(chain[1].as_slice())];
    let leaf = CertificateDer::from(chain[0].as_slice());
    let leaf = EndEntityCert::try_from(&leaf).unwrap();
    leaf.verify_for_usage(
        ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(StdDuration::from_secs(at as u64)),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn signs_an_rcgen_csr_with_the_device_profile() {
    let ca = CaHierarchy::generate("csr").unwrap();
    let (csr_der, key) = csr_with(&PKCS_ECDSA_P256_SHA256, &csr_params(DEVICE));
    let at = now();
    let issued = ca.sign_device_csr(&csr_der, DEVICE, 365, at).unwrap();

    // The chain is leaf, intermediate, root, and the PEM is the leaf.
    assert_eq!(issued.chain_der.len(), 3);
    assert_eq!(issued.chain_der[0], issued.certificate_der);
    assert_eq!(issued.chain_der[1], der_of(ca.intermediate_cert_pem()));
    assert_eq!(issued.chain_der[2], der_of(ca.root_cert_pem()));
    assert_eq!(der_of(&issued.certificate_pem), issued.certificate_der);
    assert!(ca.is_issuer_of(&issued.certificate_pem).unwrap());

    let leaf = parse(&issued.certificate_der);
    use rcgen::PublicKeyData as _;
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info());
    assert_eq!(leaf.subject().to_string(), "CN=dev-01");
    assert_eq!(issued.subject, "CN=dev-01");
    assert!(!leaf.is_ca());
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_agreement());
    assert!(!ku.key_encipherment() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && eku.other.is_empty());
    assert!(leaf.subject_alternative_name().unwrap().is_none());
    assert!(leaf.iter_extensions().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));

    assert_eq!(leaf.raw_serial().len(), 16);
    assert_eq!(leaf.raw_serial()[0] & 0x80, 0, "serial must be positive");
    assert_eq!(issued.serial_hex, hex_upper(leaf.raw_serial()));
    assert_eq!(issued.serial_hex.len(), 32);

    let validity = leaf.validity();
    assert_eq!(validity.not_before.timestamp(), at - 300);
    assert_eq!(validity.not_after.timestamp(), at + 365 * 86_400);
    assert_eq!(issued.not_before_unix, at - 300);
    assert_eq!(issued.not_after_unix, at + 365 * 86_400);

    // The leaf chains to the root with client-auth EKU; it is not a server certificate.
    webpki_verify(&issued.chain_der, KeyUsage::client_auth(), at).unwrap();
    assert!(webpki_verify(&issued.chain_der, KeyUsage::server_auth(), at).is_err());
    assert!(matches!(
        webpki_verify(
            &issued.chain_der,
            KeyUsage::client_auth(),
            at + 366 * 86_400
        ),
        Err(webpki::Error::CertExpired { .. })
    ));

    // Serials are random.
    let again = ca.sign_device_csr(&csr_der, DEVICE, 365, at).unwrap();
    assert_ne!(again.serial_hex, issued.serial_hex);
}

#[test]
fn requested_extensions_are_ignored_even_unknown_ones() {
    // As openssl writes CSRs: a subjectKeyIdentifier request, plus requests that must not be
    // honoured (CA:TRUE, keyCertSign, a SAN) and extra subject attributes.
    let mut p = csr_params(DEVICE);
    p.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    p.custom_extensions = vec![CustomExtension::from_oid_content(
        OID_SUBJECT_KEY_IDENTIFIER,
        vec![0x04, 0x04, 0xde, 0xad, 0xbe, 0xef],
    )];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![SanType::DnsName("evil.example".try_into().unwrap())];
    let (csr_der, _) = csr_with(&PKCS_ECDSA_P256_SHA256, &p);

    // The pitfall this works around: rcgen's own parser refuses the CSR.
    assert!(CertificateSigningRequestParams::from_der(&csr_der.as_slice().into()).is_err());

    let ca = CaHierarchy::generate("ext").unwrap();
    let issued = ca.sign_device_csr(&csr_der, DEVICE, 30, now()).unwrap();
    let leaf = parse(&issued.certificate_der);
    assert_eq!(leaf.subject().to_string(), "CN=dev-01");
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(!ku.key_cert_sign());
    assert!(leaf.subject_alternative_name().unwrap().is_none());
    for ext in leaf.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(ski) = ext.parsed_extension() {
            assert_ne!(ski.0, [0xde, 0xad, 0xbe, 0xef]);
        }
    }
    webpki_verify(&issued.chain_der, KeyUsage::client_auth(), now()).unwrap();
}

#[test]
fn other_key_types() {
    let ca = CaHierarchy::generate("keys").unwrap();
    let (p384, _) = csr_with(&PKCS_ECDSA_P384_SHA384, &csr_params(DEVICE));
    let issued = ca.sign_device_csr(&p384, DEVICE, 30, now()).unwrap();
    let leaf = parse(&issued.certificate_der);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_agreement());
    webpki_verify(&issued.chain_der, KeyUsage::client_auth(), now()).unwrap();

    let (ed25519, _) = csr_with(&PKCS_ED25519, &csr_params(DEVICE));
    let issued = ca.sign_device_csr(&ed25519, DEVICE, 30, now()).unwrap();
    let leaf = parse(&issued.certificate_der);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_agreement() && !ku.key_encipherment());
    webpki_verify(&issued.chain_der, KeyUsage::client_auth(), now()).unwrap();
}

#[test]
fn corrupted_signature_is_refused() {
    let ca = CaHierarchy::generate("sig").unwrap();
    let good = csr(DEVICE);
    // The signature BIT STRING is the last element: flip its last byte.
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x01;
    assert_eq!(
        ca.sign_device_csr(&bad, DEVICE, 30, now()),
        Err(Error::CsrSignatureInvalid)
    );
    // A change in the signed part (the CN's last letter) breaks the signature too.
    let mut tampered = csr("dev-0x");
    let at = tampered.windows(6).position(|w| w == b"dev-0x").unwrap();
    tampered[at + 5] = b'1';
    assert_eq!(
        ca.sign_device_csr(&tampered, DEVICE, 30, now()),
        Err(Error::CsrSignatureInvalid)
    );
}

#[test]
fn common_name_must_match() {
    let ca = CaHierarchy::generate("cn").unwrap();
    assert_eq!(
        ca.sign_device_csr(&csr("dev-02"), DEVICE, 30, now()),
        Err(Error::CnMismatch {
            expected: DEVICE.into(),
            found: Some("dev-02".into()),
        })
    );
    assert_eq!(
        ca.sign_device_csr(&csr("DEV-01"), DEVICE, 30, now()),
        Err(Error::CnMismatch {
            expected: DEVICE.into(),
            found: Some("DEV-01".into()),
        })
    );
    let mut no_cn = CertificateParams::default();
    no_cn.distinguished_name = DistinguishedName::new();
    no_cn
        .distinguished_name
        .push(DnType::OrganizationName, DEVICE);
    let (no_cn, _) = csr_with(&PKCS_ECDSA_P256_SHA256, &no_cn);
    assert_eq!(
        ca.sign_device_csr(&no_cn, DEVICE, 30, now()),
        Err(Error::CnMismatch {
            expected: DEVICE.into(),
            found: None,
        })
    );
    assert!(matches!(
        ca.sign_device_csr(&csr(""), "", 30, now()),
        Err(Error::CnMismatch { .. })
    ));
}

#[test]
fn validity_and_time_errors() {
    let ca = CaHierarchy::generate("validity").unwrap();
    let csr_der = csr(DEVICE);
    assert_eq!(
        ca.sign_device_csr(&csr_der, DEVICE, 0, now()),
        Err(Error::InvalidValidity)
    );
    assert_eq!(
        ca.sign_device_csr(&csr_der, DEVICE, 20 * 365, now()),
        Err(Error::ValidityBeyondIssuer { days: 20 * 365 })
    );
    assert_eq!(
        ca.sign_device_csr(&csr_der, DEVICE, u32::MAX, now()),
        Err(Error::ValidityBeyondIssuer { days: u32::MAX })
    );
    assert_eq!(
        ca.sign_device_csr(&csr_der, DEVICE, 30, i64::MAX),
        Err(Error::InvalidTime(i64::MAX))
    );
    assert_eq!(
        ca.sign_device_csr(&csr_der, DEVICE, 30, i64::MIN),
        Err(Error::InvalidTime(i64::MIN))
    );
}

#[test]
fn garbage_is_a_typed_error_and_never_panics() {
    let ca = CaHierarchy::generate("garbage").unwrap();
    let invalid = |r: Result<_, Error>| matches!(r, Err(Error::InvalidCsr { .. }));
    assert!(invalid(ca.sign_device_csr(&[], DEVICE, 30, now())));
    assert!(invalid(ca.sign_device_csr(b"hello", DEVICE, 30, now())));
    let good = csr(DEVICE);
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0x05, 0x00]);
    assert_eq!(
        ca.sign_device_csr(&trailing, DEVICE, 30, now()),
        Err(Error::InvalidCsr {
            reason: "trailing data after the CSR".into()
        })
    );
    // A certificate is not a CSR.
    assert!(invalid(ca.sign_device_csr(
        &der_of(ca.root_cert_pem()),
        DEVICE,
        30,
        now()
    )));
    for end in 0..good.len() {
        assert!(ca.sign_device_csr(&good[..end], DEVICE, 30, now()).is_err());
    }
    // Flipped bits never panic. The parser tolerates some changes outside the signed part
    // (such as the outer tag's class bits); those still certify only the genuine key.
    let (good, key) = csr_with(&PKCS_ECDSA_P256_SHA256, &csr_params(DEVICE));
    use rcgen::PublicKeyData as _;
    for i in 0..good.len() {
        for flip in [0x01, 0x80] {
            let mut flipped = good.clone();
            flipped[i] ^= flip;
            if let Ok(issued) = ca.sign_device_csr(&flipped, DEVICE, 30, now()) {
                let leaf = parse(&issued.certificate_der);
                assert_eq!(
                    leaf.public_key().raw,
                    key.subject_public_key_info(),
                    "byte {i}"
                );
            }
        }
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[test]
fn profile_urls_become_cdp_and_aia_extensions() {
    use crate::IssuanceProfile;
    use crate::testutil::{openssl_ok, write};
    use x509_parser::extensions::{DistributionPointName, GeneralName};

    let ca = CaHierarchy::generate("profile").unwrap();
    let profile = IssuanceProfile {
        validity_days: 7,
        crl_distribution_point: Some("http://pki.example.net/crl/int.crl".parse().unwrap()),
        ocsp_responder: Some("http://pki.example.net/ocsp".parse().unwrap()),
        ca_issuers: Some("http://pki.example.net/ca/int.der".parse().unwrap()),
    };
    let issued = ca
        .sign_device_csr_with(&csr(DEVICE), DEVICE, &profile, now())
        .unwrap();
    assert_eq!(
        issued.not_after_unix - issued.not_before_unix,
        7 * 86_400 + 300
    );
    let cert = parse(&issued.certificate_der);
    let mut cdp = None;
    let mut aia = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::CRLDistributionPoints(points) => {
                assert!(!ext.critical);
                let point = &points.points[0];
                let Some(DistributionPointName::FullName(names)) = &point.distribution_point else {
                    panic!("no full name");
                };
                let [GeneralName::URI(uri)] = names.as_slice() else {
                    panic!("{names:?}");
                };
                cdp = Some(uri.to_string());
            }
            ParsedExtension::AuthorityInfoAccess(access) => {
                assert!(!ext.critical);
                for d in &access.accessdescs {
                    let GeneralName::URI(uri) = &d.access_location else {
                        panic!("{d:?}");
                    };
                    aia.push((d.access_method.to_id_string(), uri.to_string()));
                }
            }
            _ => {}
        }
    }
    assert_eq!(cdp.as_deref(), Some("http://pki.example.net/crl/int.crl"));
    assert_eq!(
        aia,
        vec![
            (
                "1.3.6.1.5.5.7.48.1".to_owned(),
                "http://pki.example.net/ocsp".to_owned()
            ),
            (
                "1.3.6.1.5.5.7.48.2".to_owned(),
                "http://pki.example.net/ca/int.der".to_owned()
            ),
        ]
    );
    webpki_verify(&issued.chain_der, KeyUsage::client_auth(), now()).unwrap();

    // What openssl reads (and uses for `openssl ocsp -url` style lookups).
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "leaf.pem", &issued.certificate_pem);
    let text = openssl_ok(
        dir.path(),
        &["x509", "-in", "leaf.pem", "-noout", "-ocsp_uri"],
    );
    assert_eq!(text.trim(), "http://pki.example.net/ocsp");
    let text = openssl_ok(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-text"]);
    assert!(
        text.contains("URI:http://pki.example.net/crl/int.crl"),
        "{text}"
    );
    assert!(
        text.contains("CA Issuers - URI:http://pki.example.net/ca/int.der"),
        "{text}"
    );

    // Only one of the AIA URLs; and the plain profile has neither extension.
    let only_ocsp = IssuanceProfile {
        ocsp_responder: profile.ocsp_responder.clone(),
        ..IssuanceProfile::new(7)
    };
    let issued = ca
        .sign_device_csr_with(&csr(DEVICE), DEVICE, &only_ocsp, now())
        .unwrap();
    let cert = parse(&issued.certificate_der);
    let aia: Vec<_> = cert
        .extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityInfoAccess(a) => Some(a.accessdescs.len()),
            _ => None,
        })
        .collect();
    assert_eq!(aia, vec![1]);
    let plain = ca.sign_device_csr(&csr(DEVICE), DEVICE, 7, now()).unwrap();
    let cert = parse(&plain.certificate_der);
    assert!(cert.extensions().iter().all(|e| !matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityInfoAccess(_) | ParsedExtension::CRLDistributionPoints(_)
    )));
}
