use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P384_SHA384, SerialNumber, date_time_ymd,
};

use super::*;

/// 2025-01-01T00:00:00Z, inside every test certificate's validity.
const NOW: i64 = 1_735_689_600;

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2030, 1, 1);
    p
}

struct TestCa {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(cn: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = params(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        TestCa {
            cert,
            issuer: Issuer::new(p, key),
        }
    }

    fn certificate(&self) -> Certificate {
        Certificate::from_der(self.cert.der()).unwrap()
    }

    fn issue(&self, p: CertificateParams) -> rcgen::Certificate {
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &self.issuer).unwrap()
    }
}

fn leaf_pem(ca: &TestCa, cn: &str) -> String {
    ca.issue(params(cn)).pem()
}

#[test]
fn parses_pem_and_der_alike() {
    let ca = TestCa::new("Test CA");
    let der = ca.cert.der().to_vec();
    let pem = ca.cert.pem();
    let b64 = STANDARD.encode(&der);
    let wrapped: String = b64
        .as_bytes()
        .chunks(64)
        .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
        .collect();
    let one_line = pem.replace('\n', " ");
    let escaped = pem.replace('\n', "\\n");
    let with_text = format!("subject=CN = Test CA\nissuer=CN = Test CA\n{pem}\ntrailing words\n");
    for input in [
        &pem,
        &b64,
        &wrapped,
        &format!("  {b64}\n"),
        &one_line,
        &escaped,
        &with_text,
        &pem.replace('\n', "\r\n"),
    ] {
        let cert = parse_certificate(input).unwrap_or_else(|e| panic!("{e}: {input:?}"));
        assert_eq!(cert.der(), der.as_slice());
    }
    let cert = parse_certificate(&pem).unwrap();
    assert!(cert.is_ca());
    assert_eq!(cert.common_name(), Some("Test CA"));
    assert_eq!(parse_certificate(&cert.to_pem()).unwrap(), cert);
    assert_eq!(cert.to_pem(), pem.replace("\r\n", "\n"));
}

#[test]
fn info_matches_the_certificate() {
    let ca = TestCa::new("Test CA");
    let mut p = params("device-01");
    p.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    p.serial_number = Some(SerialNumber::from_slice(&[0x01, 0x02, 0xab]));
    let leaf = ca.issue(p);
    let cert = Certificate::from_der(leaf.der()).unwrap();
    let info = cert.info();
    assert_eq!(info.subject_name, "CN=device-01, O=Contoso");
    assert_eq!(info.issuer_name, "CN=Test CA");
    assert_eq!(info.not_before_utc, "2024-01-01T00:00:00Z");
    assert_eq!(info.not_after_utc, "2030-01-01T00:00:00Z");
    assert_eq!(info.serial_number, "0102AB");
    assert_eq!(info.version, 3);
    let sha1 = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, leaf.der());
    let sha256 = digest::digest(&digest::SHA256, leaf.der());
    assert_eq!(info.sha1_thumbprint, hex::encode_upper(sha1.as_ref()));
    assert_eq!(info.sha256_thumbprint, hex::encode_upper(sha256.as_ref()));
    assert_eq!(info.sha1_thumbprint.len(), 40);
    assert_eq!(info.sha256_thumbprint.len(), 64);
    assert!(
        info.sha256_thumbprint
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    );
    assert!(!cert.is_ca());
    assert_eq!(cert.common_name(), Some("device-01"));
    assert_eq!(cert.not_before_unix(), 1_704_067_200);
    assert_eq!(cert.not_after_unix(), 1_893_456_000);
}

#[test]
fn serial_with_high_bit_keeps_its_leading_zero() {
    let ca = TestCa::new("Test CA");
    let mut p = params("x");
    p.serial_number = Some(SerialNumber::from_slice(&[0xff, 0x10]));
    let cert = Certificate::from_der(ca.issue(p).der()).unwrap();
    assert_eq!(cert.info().serial_number, "00FF10");
}

#[test]
fn info_serialises_in_azure_shape() {
    let ca = TestCa::new("Test CA");
    let cert = ca.certificate();
    let json = serde_json::to_value(cert.info()).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "subjectName",
        "sha1Thumbprint",
        "sha256Thumbprint",
        "issuerName",
        "notBeforeUtc",
        "notAfterUtc",
        "serialNumber",
        "version",
    ];
    expected.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(json["version"], 3);
    let back: CertificateInfo = serde_json::from_value(json).unwrap();
    assert_eq!(&back, cert.info());
}

#[test]
fn garbage_gives_typed_errors() {
    let ca = TestCa::new("Test CA");
    let pem = ca.cert.pem();
    let key_pem = KeyPair::generate().unwrap().serialize_pem();
    let not_cert =
        |r: Result<Certificate, X509Error>| matches!(r, Err(X509Error::NotACertificate(_)));

    assert_eq!(parse_certificate(""), Err(X509Error::Empty));
    assert_eq!(parse_certificate(" \n\t "), Err(X509Error::Empty));
    assert_eq!(Certificate::from_der(&[]), Err(X509Error::Empty));
    assert_eq!(
        parse_certificate("not base64 at all!"),
        Err(X509Error::NotBase64)
    );
    assert_eq!(parse_certificate("AAA"), Err(X509Error::NotBase64));
    assert!(not_cert(parse_certificate("AAAA")));
    assert!(not_cert(parse_certificate(
        &STANDARD.encode(b"hello world")
    )));
    assert_eq!(
        parse_certificate(&format!("{pem}{pem}")),
        Err(X509Error::MultipleCertificates(2))
    );
    assert!(not_cert(parse_certificate(&key_pem)));
    assert!(not_cert(parse_certificate(&format!("{pem}{key_pem}"))));
    assert!(not_cert(parse_certificate(
        "-----BEGIN CERTIFICATE-----\nAAAA"
    )));
    assert!(not_cert(parse_certificate("-----BEGIN CERTIFICATE")));
    assert!(not_cert(parse_certificate("-----BEGIN")));
    assert_eq!(
        parse_certificate("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----"),
        Err(X509Error::NotBase64)
    );
    assert_eq!(
        parse_certificate("-----BEGIN CERTIFICATE----------END CERTIFICATE-----"),
        Err(X509Error::Empty)
    );
    // A certificate followed by extra DER bytes.
    let mut trailing = ca.cert.der().to_vec();
    trailing.extend_from_slice(&[0x05, 0x00]);
    assert_eq!(
        Certificate::from_der(&trailing),
        Err(X509Error::NotACertificate(
            "trailing data after the certificate".into()
        ))
    );
    assert!(not_cert(parse_certificate(&STANDARD.encode(&trailing))));
    // The label of a foreign block is not echoed back.
    let odd = "-----BEGIN <script>-----\nAAAA\n-----END <script>-----";
    let err = parse_certificate(odd).unwrap_err();
    assert!(!err.to_string().contains("script"), "{err}");
}

#[test]
fn truncated_and_mutated_der_never_panics() {
    let ca = TestCa::new("Test CA");
    let der = ca.issue(params("device")).der().to_vec();
    for end in 0..der.len() {
        assert!(
            Certificate::from_der(&der[..end]).is_err(),
            "prefix {end} parsed"
        );
        let _ = parse_certificate(&STANDARD.encode(&der[..end]));
    }
    for i in 0..der.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = der.clone();
            bad[i] ^= flip;
            if let Ok(cert) = Certificate::from_der(&bad) {
                // Whatever parsed must not verify if the signed part changed.
                let _ = cert.is_signed_by(&ca.certificate());
                let _ = cert.info();
            }
        }
    }
    let pem = ca.cert.pem();
    for end in 0..pem.len() {
        let _ = parse_certificate(&pem[..end]);
    }
}

#[test]
fn common_name_edge_cases() {
    let ca = TestCa::new("Test CA");
    let mut none = params("x");
    none.distinguished_name = DistinguishedName::new();
    none.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    let cert = Certificate::from_der(ca.issue(none).der()).unwrap();
    assert_eq!(cert.common_name(), None);
    assert_eq!(cert.info().subject_name, "O=Contoso");

    let utf8 = Certificate::from_der(ca.issue(params("gerät-ü")).der()).unwrap();
    assert_eq!(utf8.common_name(), Some("gerät-ü"));

    // Two CNs (rcgen keeps one per type, so turn the O attribute into a second CN): ambiguous.
    let mut two = params("a");
    two.distinguished_name.push(DnType::OrganizationName, "b");
    let mut der = ca.issue(two).der().to_vec();
    let organization_oid = [0x06, 0x03, 0x55, 0x04, 0x0a];
    let at = der.windows(5).position(|w| w == organization_oid).unwrap();
    der[at + 4] = 0x03;
    let cert = Certificate::from_der(&der).unwrap();
    assert_eq!(cert.info().subject_name, "CN=a, CN=b");
    assert_eq!(cert.common_name(), None);
    assert!(!cert.is_signed_by(&ca.certificate()));
}

#[test]
fn signature_and_name_helpers() {
    let ca = TestCa::new("Test CA");
    let other = TestCa::new("Test CA");
    let leaf = parse_certificate(&leaf_pem(&ca, "device")).unwrap();
    assert!(leaf.is_signed_by(&ca.certificate()));
    assert!(!leaf.is_signed_by(&other.certificate()));
    assert!(!leaf.is_signed_by(&leaf));
    assert!(ca.certificate().is_signed_by(&ca.certificate()));
    assert!(leaf.is_issued_by_name(&ca.certificate()));
    // Same name, different key: the name matches, the signature does not.
    assert!(leaf.is_issued_by_name(&other.certificate()));
    assert!(!ca.certificate().is_issued_by_name(&leaf));
    assert!(leaf.is_valid_at(NOW));
    assert!(leaf.is_valid_at(leaf.not_before_unix()));
    assert!(leaf.is_valid_at(leaf.not_after_unix()));
    assert!(!leaf.is_valid_at(leaf.not_before_unix() - 1));
    assert!(!leaf.is_valid_at(leaf.not_after_unix() + 1));
}

#[test]
fn p384_issuer_verifies() {
    // A P-384 CA signing with ECDSA-SHA384.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut p = params("P-384 CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    let ca = TestCa {
        cert,
        issuer: Issuer::new(p, key),
    };
    let code = "0123456789ABCDEF";
    let verification = leaf_pem(&ca, code);
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &verification, code, NOW),
        Ok(())
    );
}

#[test]
fn proof_of_possession_succeeds() {
    let ca = TestCa::new("Contoso Root");
    let code = "3D2C9E1B0A7F4E5D6C8B9A0F1E2D3C4B5A6F7E8D9C0B1A2F";
    let verification = leaf_pem(&ca, code);
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &verification, code, NOW),
        Ok(())
    );
    // Base64 DER works as well as PEM.
    let der_b64 = STANDARD.encode(parse_certificate(&verification).unwrap().der());
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &der_b64, code, NOW),
        Ok(())
    );
}

#[test]
fn proof_of_possession_failures() {
    let ca = TestCa::new("Contoso Root");
    let other = TestCa::new("Contoso Root");
    let code = "ABCDEF";

    let wrong_cn = leaf_pem(&ca, "ABCDEG");
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &wrong_cn, code, NOW),
        Err(PopError::CommonNameMismatch)
    );
    // Exact comparison: case matters.
    let lower = leaf_pem(&ca, "abcdef");
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &lower, code, NOW),
        Err(PopError::CommonNameMismatch)
    );
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &leaf_pem(&ca, code), "", NOW),
        Err(PopError::CommonNameMismatch)
    );

    let foreign = leaf_pem(&other, code);
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &foreign, code, NOW),
        Err(PopError::SignatureInvalid)
    );
    // Self-signed with CN = code: proves nothing about the CA's key.
    let self_signed = params(code)
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &self_signed, code, NOW),
        Err(PopError::SignatureInvalid)
    );

    let mut old = params(code);
    old.not_before = date_time_ymd(2020, 1, 1);
    old.not_after = date_time_ymd(2021, 1, 1);
    let expired = ca.issue(old).pem();
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &expired, code, NOW),
        Err(PopError::Expired)
    );
    let mut future = params(code);
    future.not_before = date_time_ymd(2029, 1, 1);
    let not_yet = ca.issue(future).pem();
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), &not_yet, code, NOW),
        Err(PopError::NotYetValid)
    );

    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), "", code, NOW),
        Err(PopError::Parse(X509Error::Empty))
    );
    assert_eq!(
        verify_proof_of_possession(&ca.certificate(), "%%%", code, NOW),
        Err(PopError::Parse(X509Error::NotBase64))
    );
}

#[test]
fn chains_to_walks_intermediates_to_an_anchor() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca = |name: &str, issuer: Option<(&CertificateParams, &KeyPair)>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let der = match issuer {
            None => params.self_signed(&key).unwrap().der().to_vec(),
            Some((p, k)) => params
                .signed_by(&key, &Issuer::from_params(p, k))
                .unwrap()
                .der()
                .to_vec(),
        };
        (der, params, key)
    };
    let root = ca("Root", None);
    let intermediate = ca("Intermediate", Some((&root.1, &root.2)));
    let other = ca("Other Root", None);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "dev");
    let leaf = leaf_params
        .signed_by(
            &leaf_key,
            &Issuer::from_params(&intermediate.1, &intermediate.2),
        )
        .unwrap();
    let leaf = Certificate::from_der(leaf.der()).unwrap();
    let anchor = |der: &[u8]| vec![Certificate::from_der(der).unwrap()];
    let now = 1_900_000_000;
    assert!(chains_to(
        &leaf,
        std::slice::from_ref(&intermediate.0),
        &anchor(&root.0),
        now
    ));
    assert!(chains_to(&leaf, &[], &anchor(&intermediate.0), now));
    assert!(
        !chains_to(&leaf, &[], &anchor(&root.0), now),
        "the intermediate is missing"
    );
    assert!(!chains_to(
        &leaf,
        std::slice::from_ref(&intermediate.0),
        &anchor(&other.0),
        now
    ));
}
