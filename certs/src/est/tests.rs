use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::*;
use crate::testutil::{ca_and_device, now, openssl_ok, write};

fn decode_body(body: &str) -> Vec<u8> {
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD.decode(compact).unwrap()
}

#[test]
fn certs_only_pkcs7_is_read_by_openssl_in_order() {
    let (ca, issued) = ca_and_device("est-device");
    let body = certs_only_body(&issued.chain_der);
    assert!(body.ends_with("\r\n"));
    assert!(body.split("\r\n").all(|line| line.len() <= 64));
    assert_eq!(decode_body(&body), certs_only_pkcs7(&issued.chain_der));

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "p7.b64", &body);
    openssl_ok(d, &["base64", "-d", "-in", "p7.b64", "-out", "p7.der"]);
    let text = openssl_ok(
        d,
        &[
            "pkcs7",
            "-inform",
            "DER",
            "-in",
            "p7.der",
            "-print_certs",
            "-noout",
        ],
    );
    let subjects: Vec<&str> = text.lines().filter(|l| l.starts_with("subject=")).collect();
    assert_eq!(subjects.len(), 3, "{text}");
    assert!(subjects[0].contains("est-device"), "{text}");
    assert!(subjects[1].contains("Intermediate CA"), "{text}");
    assert!(subjects[2].contains("Root CA"), "{text}");

    // The PEM certificates openssl prints back are the ones we put in.
    let pem = openssl_ok(
        d,
        &["pkcs7", "-inform", "DER", "-in", "p7.der", "-print_certs"],
    );
    assert!(pem.contains(issued.certificate_pem.trim()), "{pem}");
    assert!(pem.contains(ca.root_cert_pem().trim()), "{pem}");

    // /cacerts with the bundle only, and the empty degenerate case.
    for certs in [vec![], vec![issued.chain_der[2].clone()]] {
        write(d, "p7.der", certs_only_pkcs7(&certs));
        let text = openssl_ok(d, &["pkcs7", "-inform", "DER", "-in", "p7.der", "-print"]);
        assert!(text.contains("pkcs7-signedData"), "{text}");
    }
}

#[test]
fn decodes_openssl_csrs_in_base64_and_pem() {
    let (ca, _) = ca_and_device("unused");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl_ok(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "device.key",
            "-subj",
            "/CN=est-device",
            "-outform",
            "DER",
            "-out",
            "csr.der",
        ],
    );
    openssl_ok(
        d,
        &["req", "-in", "csr.der", "-inform", "DER", "-out", "csr.pem"],
    );
    let der = std::fs::read(d.join("csr.der")).unwrap();
    let pem = std::fs::read_to_string(d.join("csr.pem")).unwrap();

    // What an EST client sends: base64 with CRLF line breaks (openssl base64 uses LF).
    let b64 = openssl_ok(d, &["base64", "-in", "csr.der"]);
    let crlf = b64.replace('\n', "\r\n");
    let unpadded = STANDARD.encode(&der).trim_end_matches('=').to_owned();
    for body in [
        b64.clone(),
        crlf,
        unpadded,
        format!("  {b64}\t\r\n"),
        pem.clone(),
    ] {
        assert_eq!(decode_csr_body(body.as_bytes()).unwrap(), der, "{body:?}");
    }
    let new_label = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
    assert_eq!(decode_csr_body(new_label.as_bytes()).unwrap(), der);

    // And the decoded CSR is one the CA signs.
    let issued = ca.sign_device_csr(&der, "est-device", 30, now()).unwrap();
    assert_eq!(issued.subject, "CN=est-device");
}

#[test]
fn garbage_bodies_are_typed_errors() {
    let csr = crate::testutil::device_csr("x").1;
    let b64 = STANDARD.encode(&csr);
    let cert_pem = ca_and_device("y").1.certificate_pem;
    let table: Vec<(Vec<u8>, EstError)> = vec![
        (b"".to_vec(), EstError::Empty),
        (b" \r\n\t".to_vec(), EstError::Empty),
        (b"!!!!".to_vec(), EstError::NotBase64),
        (b"QUJD=E".to_vec(), EstError::NotBase64),
        (cert_pem.into_bytes(), EstError::NoCsrBlock),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n".to_vec(),
            EstError::NoCsrBlock,
        ),
    ];
    for (body, expected) in table {
        assert_eq!(decode_csr_body(&body), Err(expected), "{body:?}");
    }
    // Valid base64 of things that are not one CSR.
    let mut trailing = csr.clone();
    trailing.push(0);
    for der in [b"hello".to_vec(), csr[..csr.len() - 1].to_vec(), trailing] {
        let body = STANDARD.encode(&der);
        assert!(
            matches!(
                decode_csr_body(body.as_bytes()),
                Err(EstError::NotACsr { .. })
            ),
            "{body}"
        );
    }
    // Truncated base64 never panics.
    for len in 0..b64.len() {
        let _ = decode_csr_body(&b64.as_bytes()[..len]);
    }
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..5_000 {
        let bytes: Vec<u8> = (0..(round % 61))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        let _ = decode_csr_body(&bytes);
        let _ = decode_csr_body(STANDARD.encode(&bytes).as_bytes());
    }
}

#[test]
fn csrattrs_encodings() {
    assert_eq!(csrattrs_der(DEFAULT_CSR_ATTRIBUTES), vec![0x30, 0x00]);
    assert_eq!(csrattrs_body(DEFAULT_CSR_ATTRIBUTES), "MAA=\r\n");
    let attributes = [
        CsrAttribute::ChallengePassword,
        CsrAttribute::ExtensionRequest,
        CsrAttribute::EcdsaWithSha256,
        CsrAttribute::Oid(vec![1, 3, 6, 1, 4, 1, 99999, 1]),
        // Skipped: not encodable.
        CsrAttribute::Oid(vec![7]),
        CsrAttribute::Oid(vec![1, 40]),
    ];
    let body = csrattrs_body(&attributes);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "attrs.der", decode_body(&body));
    let text = openssl_ok(
        dir.path(),
        &["asn1parse", "-inform", "DER", "-in", "attrs.der"],
    );
    assert!(text.contains(":challengePassword"), "{text}");
    assert!(text.contains(":Extension Request"), "{text}");
    assert!(text.contains(":ecdsa-with-SHA256"), "{text}");
    assert!(text.contains(":1.3.6.1.4.1.99999.1"), "{text}");
    assert_eq!(text.matches("OBJECT").count(), 4, "{text}");
}
