use super::*;
use crate::testutil::{device_csr, now, openssl, openssl_ok, output_text, write};

#[test]
fn reason_codes_have_rfc_names_and_values() {
    let table = [
        ("unspecified", 0, ReasonCode::Unspecified),
        ("keyCompromise", 1, ReasonCode::KeyCompromise),
        ("cACompromise", 2, ReasonCode::CaCompromise),
        ("affiliationChanged", 3, ReasonCode::AffiliationChanged),
        ("superseded", 4, ReasonCode::Superseded),
        ("cessationOfOperation", 5, ReasonCode::CessationOfOperation),
        ("certificateHold", 6, ReasonCode::CertificateHold),
        ("removeFromCRL", 8, ReasonCode::RemoveFromCrl),
        ("privilegeWithdrawn", 9, ReasonCode::PrivilegeWithdrawn),
        ("aACompromise", 10, ReasonCode::AaCompromise),
    ];
    assert_eq!(table.len(), ReasonCode::ALL.len());
    for (name, code, reason) in table {
        assert_eq!(name.parse::<ReasonCode>(), Ok(reason), "{name}");
        assert_eq!(
            name.to_uppercase().parse::<ReasonCode>(),
            Ok(reason),
            "{name}"
        );
        assert_eq!(reason.name(), name);
        assert_eq!(reason.to_string(), name);
        assert_eq!(reason.code(), code);
        assert_eq!(ReasonCode::from_code(code), Some(reason));
        // rcgen's enum carries the same numbers.
        if let Some(r) = reason.to_rcgen() {
            assert_eq!(r as u8, code);
        }
    }
    for code in [7, 11, 255] {
        assert_eq!(ReasonCode::from_code(code), None);
    }
    for bad in ["", "key compromise", "keyCompromise ", "7", "revoked"] {
        assert_eq!(
            bad.parse::<ReasonCode>(),
            Err(UnknownReasonCode(bad.to_owned()))
        );
    }
}

#[test]
fn serial_hex_parses() {
    assert_eq!(parse_serial_hex("0A:ff").unwrap(), vec![0x0a, 0xff]);
    assert_eq!(parse_serial_hex("01").unwrap(), vec![1]);
    assert_eq!(parse_serial_hex(&"AB".repeat(21)).unwrap().len(), 21);
    for bad in ["", "1", "zz", "0x01", "é1", &"AB".repeat(22)] {
        assert!(
            matches!(parse_serial_hex(bad), Err(Error::InvalidSerial(_))),
            "{bad}"
        );
    }
}

fn params(revoked: Vec<RevokedEntry>) -> CrlParams {
    let now = now();
    CrlParams {
        crl_number: 7,
        this_update_unix: now - 60,
        next_update_unix: now + 86_400,
        revoked,
    }
}

#[test]
fn refuses_bad_parameters() {
    let ca = CaHierarchy::generate("crl").unwrap();
    let mut p = params(vec![]);
    p.next_update_unix = p.this_update_unix;
    assert!(matches!(ca.sign_crl(&p), Err(Error::InvalidCrl { .. })));
    p.next_update_unix = i64::MAX;
    assert_eq!(ca.sign_crl(&p), Err(Error::InvalidTime(i64::MAX)));
    let empty = RevokedEntry {
        serial: vec![],
        revoked_at_unix: now(),
        reason: None,
    };
    assert!(matches!(
        ca.sign_crl(&params(vec![empty])),
        Err(Error::InvalidSerial(_))
    ));
}

#[test]
fn crl_parses_back_with_every_field() {
    let ca = CaHierarchy::generate("crl").unwrap();
    let entries: Vec<RevokedEntry> = ReasonCode::ALL
        .into_iter()
        .enumerate()
        .map(|(i, reason)| RevokedEntry {
            serial: vec![0x40, u8::try_from(i).unwrap()],
            revoked_at_unix: 1_700_000_000 + i64::try_from(i).unwrap(),
            reason: Some(reason),
        })
        .collect();
    let p = params(entries);
    let crl = ca.sign_crl(&p).unwrap();
    assert!(crl.pem.starts_with("-----BEGIN X509 CRL-----\n"));

    let (rest, parsed) = x509_parser::parse_x509_crl(&crl.der).unwrap();
    assert!(rest.is_empty());
    assert_eq!(parsed.version(), Some(x509_parser::x509::X509Version::V2));
    assert_eq!(parsed.crl_number().unwrap().to_u64_digits(), vec![7]);
    assert_eq!(parsed.last_update().timestamp(), p.this_update_unix);
    assert_eq!(
        parsed.next_update().unwrap().timestamp(),
        p.next_update_unix
    );
    let int = crate::pem::parse_der(&ca.intermediate_der, "int").unwrap();
    assert_eq!(parsed.issuer().as_raw(), int.subject().as_raw());
    let revoked: Vec<_> = parsed.iter_revoked_certificates().collect();
    assert_eq!(revoked.len(), ReasonCode::ALL.len());
    for (i, (entry, reason)) in revoked.iter().zip(ReasonCode::ALL).enumerate() {
        assert_eq!(entry.raw_serial(), [0x40, u8::try_from(i).unwrap()]);
        assert_eq!(
            entry.revocation_date.timestamp(),
            1_700_000_000 + i64::try_from(i).unwrap()
        );
        let code = entry.reason_code().map(|(_, r)| r.0);
        if reason == ReasonCode::Unspecified {
            assert_eq!(code, None);
        } else {
            assert_eq!(code, Some(reason.code()));
        }
    }
}

/// `openssl crl` checks the signature with the intermediate; `openssl verify -crl_check`
/// refuses the revoked certificate and accepts the other one.
#[test]
fn openssl_verifies_the_crl_and_honours_it() {
    let ca = CaHierarchy::generate("crl interop").unwrap();
    let now = now();
    let (_, csr) = device_csr("revoked-device");
    let revoked = ca.sign_device_csr(&csr, "revoked-device", 30, now).unwrap();
    let (_, csr) = device_csr("good-device");
    let good = ca.sign_device_csr(&csr, "good-device", 30, now).unwrap();

    let crl = ca
        .sign_crl(&params(vec![RevokedEntry {
            serial: parse_serial_hex(&revoked.serial_hex).unwrap(),
            revoked_at_unix: now - 30,
            reason: Some(ReasonCode::KeyCompromise),
        }]))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "crl.der", &crl.der);
    write(d, "crl.pem", &crl.pem);
    write(d, "bundle.pem", ca.trust_bundle_pem());
    write(d, "root.pem", ca.root_cert_pem());
    write(d, "revoked.pem", &revoked.certificate_pem);
    write(d, "good.pem", &good.certificate_pem);

    let text = openssl_ok(
        d,
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "crl.der",
            "-CAfile",
            "bundle.pem",
            "-noout",
        ],
    );
    assert!(text.contains("verify OK"), "{text}");

    let text = openssl_ok(d, &["crl", "-in", "crl.pem", "-noout", "-text"]);
    assert!(text.contains("Version 2"), "{text}");
    assert!(text.contains("X509v3 CRL Number"), "{text}");
    assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    assert!(text.contains(&revoked.serial_hex), "{text}");

    // The root did not sign this CRL.
    let out = openssl(
        d,
        &[
            "crl", "-inform", "DER", "-in", "crl.der", "-CAfile", "root.pem", "-noout",
        ],
    );
    assert!(!output_text(&out).contains("verify OK"));

    let out = openssl(
        d,
        &[
            "verify",
            "-crl_check",
            "-CRLfile",
            "crl.pem",
            "-CAfile",
            "bundle.pem",
            "revoked.pem",
        ],
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("certificate revoked"), "{text}");

    let text = openssl_ok(
        d,
        &[
            "verify",
            "-crl_check",
            "-CRLfile",
            "crl.pem",
            "-CAfile",
            "bundle.pem",
            "good.pem",
        ],
    );
    assert!(text.contains("good.pem: OK"), "{text}");
}

#[test]
fn empty_crl_is_valid_for_openssl() {
    let ca = CaHierarchy::generate("empty crl").unwrap();
    let crl = ca.sign_crl(&params(vec![])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "crl.der", &crl.der);
    write(dir.path(), "bundle.pem", ca.trust_bundle_pem());
    let text = openssl_ok(
        dir.path(),
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "crl.der",
            "-CAfile",
            "bundle.pem",
            "-noout",
        ],
    );
    assert!(text.contains("verify OK"), "{text}");
}
