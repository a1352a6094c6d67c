use std::path::Path;

use super::*;
use crate::testutil::{device_csr, now, openssl, openssl_ok, output_text, write};

struct Fixture {
    ca: CaHierarchy,
    dir: tempfile::TempDir,
    good: crate::IssuedDeviceCertificate,
    revoked: crate::IssuedDeviceCertificate,
    unknown: crate::IssuedDeviceCertificate,
}

fn fixture() -> Fixture {
    let ca = CaHierarchy::generate("ocsp").unwrap();
    let issue = |cn: &str| {
        let (_, csr) = device_csr(cn);
        ca.sign_device_csr(&csr, cn, 30, now()).unwrap()
    };
    let (good, revoked, unknown) = (issue("good"), issue("revoked"), issue("unknown"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "int.pem", ca.intermediate_cert_pem());
    write(d, "bundle.pem", ca.trust_bundle_pem());
    write(d, "good.pem", &good.certificate_pem);
    write(d, "revoked.pem", &revoked.certificate_pem);
    write(d, "unknown.pem", &unknown.certificate_pem);
    Fixture {
        ca,
        dir,
        good,
        revoked,
        unknown,
    }
}

fn openssl_request(d: &Path, extra: &[&str]) -> Vec<u8> {
    // The digest option must come before the certificates.
    let mut args = vec!["ocsp"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "-issuer",
        "int.pem",
        "-cert",
        "good.pem",
        "-cert",
        "revoked.pem",
        "-cert",
        "unknown.pem",
        "-reqout",
        "req.der",
    ]);
    openssl_ok(d, &args);
    std::fs::read(d.join("req.der")).unwrap()
}

/// Statuses the way the service would decide them: by serial.
fn statuses(f: &Fixture, request: &OcspRequest, signer: &OcspSigner) -> Vec<(CertId, CertStatus)> {
    request
        .cert_ids
        .iter()
        .map(|id| {
            assert!(id.matches_issuer(signer.issuer()));
            let status = if id.serial_hex() == f.good.serial_hex {
                CertStatus::Good
            } else if id.serial_hex() == f.revoked.serial_hex {
                CertStatus::Revoked {
                    revoked_at_unix: now() - 3600,
                    reason: Some(ReasonCode::KeyCompromise),
                }
            } else {
                assert_eq!(id.serial_hex(), f.unknown.serial_hex);
                CertStatus::Unknown
            };
            (id.clone(), status)
        })
        .collect()
}

/// Verifies `resp.der` against `req.der` (signature with the bundle, nonce, times) and
/// prints its text. With `-cert` openssl builds a fresh request (and nonce) of its own, so the
/// nonce is checked here and the per-certificate summary in [`check_statuses`].
fn check_response(d: &Path) -> (bool, String) {
    let out = openssl(
        d,
        &[
            "ocsp",
            "-respin",
            "resp.der",
            "-reqin",
            "req.der",
            "-CAfile",
            "bundle.pem",
            "-resp_text",
        ],
    );
    (out.status.success(), output_text(&out))
}

/// Verifies `resp.der` and prints openssl's status line for each certificate.
fn check_statuses(d: &Path) -> (bool, String) {
    let out = openssl(
        d,
        &[
            "ocsp",
            "-no_nonce",
            "-respin",
            "resp.der",
            "-CAfile",
            "bundle.pem",
            "-issuer",
            "int.pem",
            "-cert",
            "good.pem",
            "-cert",
            "revoked.pem",
            "-cert",
            "unknown.pem",
        ],
    );
    (out.status.success(), output_text(&out))
}

#[test]
fn parses_openssl_requests_sha1_and_sha256_with_nonce() {
    let f = fixture();
    let d = f.dir.path();
    let signer = f.ca.ocsp_signer().unwrap();
    for (extra, algorithm) in [
        (&["-nonce"][..], HashAlgorithm::Sha1),
        (&["-nonce", "-sha256"][..], HashAlgorithm::Sha256),
        (&["-no_nonce", "-sha384"][..], HashAlgorithm::Sha384),
    ] {
        let der = openssl_request(d, extra);
        let request = OcspRequest::parse(&der).unwrap();
        assert_eq!(request.cert_ids.len(), 3, "{extra:?}");
        assert!(!request.signed);
        let serials: Vec<String> = request.cert_ids.iter().map(CertId::serial_hex).collect();
        assert_eq!(
            serials,
            [
                f.good.serial_hex.clone(),
                f.revoked.serial_hex.clone(),
                f.unknown.serial_hex.clone()
            ]
        );
        for id in &request.cert_ids {
            assert_eq!(id.hash_algorithm, algorithm);
            assert!(id.matches_issuer(signer.issuer()), "{extra:?}");
            assert_eq!(id.serial().len(), 16);
        }
        if extra.contains(&"-nonce") {
            // RFC 8954: an OCTET STRING holding openssl's 16 random bytes.
            let nonce = request.nonce.as_deref().unwrap();
            assert_eq!(nonce.len(), 18);
            assert_eq!(&nonce[..2], &[0x04, 0x10]);
        } else {
            assert_eq!(request.nonce, None);
        }
    }

    // Another CA's issuer does not match.
    let other = CaHierarchy::generate("other")
        .unwrap()
        .ocsp_signer()
        .unwrap();
    let request = OcspRequest::parse(&openssl_request(d, &[])).unwrap();
    assert!(!request.cert_ids[0].matches_issuer(other.issuer()));
}

#[test]
fn openssl_accepts_signed_responses_good_revoked_unknown_and_checks_the_nonce() {
    let f = fixture();
    let d = f.dir.path();
    let signer = f.ca.ocsp_signer().unwrap();
    let request = OcspRequest::parse(&openssl_request(d, &["-nonce"])).unwrap();
    let answers = statuses(&f, &request, &signer);
    let now = now();

    let response = build_response(
        &signer,
        &answers,
        request.nonce.as_deref(),
        now,
        Some(now + 3600),
    )
    .unwrap();
    write(d, "resp.der", &response);
    let (ok, text) = check_response(d);
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains("Cert Status: good"), "{text}");
    assert!(text.contains("Cert Status: revoked"), "{text}");
    assert!(
        text.contains("Revocation Reason: keyCompromise (0x1)"),
        "{text}"
    );
    assert!(text.contains("Cert Status: unknown"), "{text}");
    assert!(text.contains("OCSP Nonce"), "{text}");
    assert!(!text.contains("WARNING"), "{text}");
    assert!(!text.contains("Nonce Verify error"), "{text}");
    let (ok, text) = check_statuses(d);
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains("good.pem: good"), "{text}");
    assert!(text.contains("revoked.pem: revoked"), "{text}");
    assert!(text.contains("Reason: keyCompromise"), "{text}");
    assert!(text.contains("unknown.pem: unknown"), "{text}");
    assert!(!text.contains("WARNING"), "{text}");

    // The intermediate as the only trusted validator works too.
    let out = openssl(
        d,
        &[
            "ocsp",
            "-no_nonce",
            "-respin",
            "resp.der",
            "-VAfile",
            "int.pem",
            "-issuer",
            "int.pem",
            "-cert",
            "good.pem",
        ],
    );
    let text = output_text(&out);
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains("good.pem: good"), "{text}");

    let text = openssl_ok(
        d,
        &["ocsp", "-respin", "resp.der", "-resp_text", "-noverify"],
    );
    assert!(text.contains("Responder Id: "), "{text}");
    assert!(text.contains("OCSP Nonce"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");

    // A different nonce: openssl refuses.
    let wrong = [0x04, 0x02, 0xaa, 0xbb];
    let response = build_response(&signer, &answers, Some(&wrong), now, Some(now + 3600)).unwrap();
    write(d, "resp.der", &response);
    let (ok, text) = check_response(d);
    assert!(!ok, "{text}");
    assert!(text.contains("Nonce Verify error"), "{text}");

    // No nonce: openssl warns.
    let response = build_response(&signer, &answers, None, now, None).unwrap();
    write(d, "resp.der", &response);
    let (_, text) = check_response(d);
    assert!(text.contains("WARNING: no nonce in response"), "{text}");
    assert!(text.contains("Response verify OK"), "{text}");

    // A flipped signature bit: openssl refuses.
    let mut response = build_response(&signer, &answers, None, now, None).unwrap();
    let last = response.len() - 1;
    let cert_len = f.ca.intermediate_der.len();
    // The signature ends right before the `[0]` certs; flip a byte inside it.
    response[last - cert_len - 6] ^= 0x01;
    write(d, "resp.der", &response);
    let (ok, text) = check_statuses(d);
    assert!(!ok, "{text}");
    assert!(!text.contains("Response verify OK"), "{text}");
}

#[test]
fn signer_from_another_ca_is_refused_by_openssl() {
    let f = fixture();
    let d = f.dir.path();
    let request = OcspRequest::parse(&openssl_request(d, &["-nonce"])).unwrap();
    let other = CaHierarchy::generate("other")
        .unwrap()
        .ocsp_signer()
        .unwrap();
    let answers: Vec<_> = request
        .cert_ids
        .iter()
        .map(|id| (id.clone(), CertStatus::Good))
        .collect();
    let response = build_response(&other, &answers, request.nonce.as_deref(), now(), None).unwrap();
    write(d, "resp.der", &response);
    let (ok, text) = check_statuses(d);
    assert!(!ok, "{text}");
    assert!(!text.contains("Response verify OK"), "{text}");
}

#[test]
fn failure_responses_are_what_openssl_expects() {
    let dir = tempfile::tempdir().unwrap();
    let table = [
        (OcspFailure::MalformedRequest, 1, "malformedrequest"),
        (OcspFailure::InternalError, 2, "internalerror"),
        (OcspFailure::TryLater, 3, "trylater"),
        (OcspFailure::SigRequired, 5, "sigrequired"),
        (OcspFailure::Unauthorized, 6, "unauthorized"),
    ];
    for (failure, code, name) in table {
        assert_eq!(failure.code(), code);
        let der = failure.to_der();
        assert_eq!(der, vec![0x30, 0x03, 0x0a, 0x01, code]);
        write(dir.path(), "fail.der", &der);
        let out = openssl(dir.path(), &["ocsp", "-respin", "fail.der", "-resp_text"]);
        let text = output_text(&out);
        assert!(
            text.contains(&format!("Responder Error: {name} ({code})")),
            "{text}"
        );
    }
}

#[test]
fn issuer_cert_id_round_trips_and_matches() {
    let ca = CaHierarchy::generate("ids").unwrap();
    let signer = ca.ocsp_signer().unwrap();
    for serial in [&[0x01][..], &[0x80, 0x01], &[0x00, 0x00, 0x7f]] {
        let id = signer.issuer().cert_id(serial);
        assert!(id.matches_issuer(signer.issuer()));
        let parsed = CertId::parse(Reader::single(id.der()).unwrap()).unwrap();
        assert_eq!(parsed, id);
        let trimmed: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
        assert_eq!(id.serial(), trimmed.as_slice());
    }
}

#[test]
fn build_response_refuses_bad_times() {
    let ca = CaHierarchy::generate("times").unwrap();
    let signer = ca.ocsp_signer().unwrap();
    let id = signer.issuer().cert_id(&[1]);
    let now = now();
    assert_eq!(
        build_response(
            &signer,
            &[(id.clone(), CertStatus::Good)],
            None,
            i64::MAX,
            None
        ),
        Err(Error::InvalidTime(i64::MAX))
    );
    assert!(
        build_response(
            &signer,
            &[(id.clone(), CertStatus::Good)],
            None,
            now,
            Some(now - 1)
        )
        .is_err()
    );
    let revoked = CertStatus::Revoked {
        revoked_at_unix: 253_402_300_800,
        reason: None,
    };
    assert_eq!(
        build_response(&signer, &[(id, revoked)], None, now, None),
        Err(Error::InvalidTime(253_402_300_800))
    );
}

#[test]
fn signer_checks_its_inputs() {
    let ca = CaHierarchy::generate("signer").unwrap();
    let other = CaHierarchy::generate("other").unwrap();
    assert_eq!(
        OcspSigner::from_pem(ca.intermediate_cert_pem(), other.intermediate_key_pem()).unwrap_err(),
        Error::KeyMismatch { what: "issuer" }
    );
    assert!(OcspSigner::from_pem("junk", ca.intermediate_key_pem()).is_err());
    assert!(!format!("{:?}", ca.ocsp_signer().unwrap()).contains("PRIVATE"));
}

/// A minimal valid request built by hand, for the structural tests below.
fn minimal_request(ca: &CaHierarchy, extensions: Option<Vec<u8>>) -> Vec<u8> {
    let id = ca.ocsp_signer().unwrap().issuer().cert_id(&[0x42]);
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next().write_sequence(|w| {
                    w.next().write_sequence(|w| w.next().write_der(id.der()));
                });
                if let Some(ext) = &extensions {
                    w.next().write_tagged(Tag::context(2), |w| w.write_der(ext));
                }
            })
        })
    })
}

fn nonce_extensions(values: &[&[u8]]) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for value in values {
                w.next().write_sequence(|w| {
                    w.next()
                        .write_oid(&ObjectIdentifier::from_slice(ID_PKIX_OCSP_NONCE));
                    w.next().write_bytes(value);
                });
            }
        })
    })
}

#[test]
fn structural_errors_are_typed() {
    let ca = CaHierarchy::generate("structure").unwrap();
    let good = minimal_request(&ca, None);
    let parsed = OcspRequest::parse(&good).unwrap();
    assert_eq!(parsed.cert_ids[0].serial(), [0x42]);
    assert_eq!(parsed.nonce, None);

    let with_nonce = minimal_request(&ca, Some(nonce_extensions(&[b"\x04\x01\x07"])));
    assert_eq!(
        OcspRequest::parse(&with_nonce).unwrap().nonce.as_deref(),
        Some(&b"\x04\x01\x07"[..])
    );
    let two_nonces = minimal_request(&ca, Some(nonce_extensions(&[b"\x04\x00", b"\x04\x00"])));
    assert_eq!(
        OcspRequest::parse(&two_nonces),
        Err(OcspRequestError::Malformed { at: "nonce" })
    );
    let long = vec![0u8; MAX_NONCE_LEN + 1];
    let long_nonce = minimal_request(&ca, Some(nonce_extensions(&[&long])));
    assert_eq!(
        OcspRequest::parse(&long_nonce),
        Err(OcspRequestError::Malformed { at: "nonce" })
    );

    let empty_list = yasna::construct_der(|w| {
        w.write_sequence(|w| w.next().write_sequence(|w| w.next().write_sequence(|_| {})))
    });
    assert_eq!(
        OcspRequest::parse(&empty_list),
        Err(OcspRequestError::NoCertIds)
    );

    let id = ca.ocsp_signer().unwrap().issuer().cert_id(&[1]);
    let many = |n: usize, version: Option<i64>| {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_sequence(|w| {
                    if let Some(v) = version {
                        w.next().write_tagged(Tag::context(0), |w| w.write_i64(v));
                    }
                    w.next().write_sequence(|w| {
                        for _ in 0..n {
                            w.next().write_sequence(|w| w.next().write_der(id.der()));
                        }
                    });
                })
            })
        })
    };
    assert_eq!(
        OcspRequest::parse(&many(MAX_CERT_IDS, None))
            .unwrap()
            .cert_ids
            .len(),
        MAX_CERT_IDS
    );
    assert_eq!(
        OcspRequest::parse(&many(MAX_CERT_IDS + 1, None)),
        Err(OcspRequestError::TooManyCertIds)
    );
    assert_eq!(
        OcspRequest::parse(&many(1, Some(1))),
        Err(OcspRequestError::UnsupportedVersion(1))
    );
    // Trailing bytes after the request.
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        OcspRequest::parse(&trailing),
        Err(OcspRequestError::Malformed { .. })
    ));
}

/// Truncations, bit flips and random bytes: always an error or a parse, never a panic.
#[test]
fn fuzzish_inputs_never_panic() {
    let f = fixture();
    let real = openssl_request(f.dir.path(), &["-nonce"]);
    assert!(OcspRequest::parse(&real).is_ok());
    for len in 0..real.len() {
        assert!(OcspRequest::parse(&real[..len]).is_err(), "prefix {len}");
    }
    for i in 0..real.len() {
        for bit in 0..8 {
            let mut mutated = real.clone();
            mutated[i] ^= 1 << bit;
            let _ = OcspRequest::parse(&mutated);
        }
    }
    // Deterministic pseudo-random inputs (xorshift), some starting like a SEQUENCE.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..20_000 {
        let len = (round % 97) + 1;
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        if round % 2 == 0 {
            bytes[0] = 0x30;
        }
        let _ = OcspRequest::parse(&bytes);
    }
    for edge in [
        &[][..],
        &[0x30],
        &[0x30, 0x80],
        &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
        &[0x30, 0x88, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &[0x30, 0x02, 0x30, 0x00],
        &[0x30, 0x04, 0x30, 0x02, 0x30, 0x00],
        &[
            0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ],
    ] {
        assert!(OcspRequest::parse(edge).is_err(), "{edge:?}");
    }
}
