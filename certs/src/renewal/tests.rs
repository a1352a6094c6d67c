use rcgen::{CertificateParams, DnType, DnValue};

use super::*;
use crate::CaHierarchy;
use crate::testutil::{device_csr, now, openssl_ok, write};

/// (name, policy, notBefore, notAfter, now, expected).
type Row = (
    &'static str,
    RenewalPolicy,
    i64,
    i64,
    i64,
    Result<(), RenewalRefusal>,
);

const NB: i64 = 1_000_000;
const NA: i64 = NB + 3_000; // a 3000-second lifetime

#[test]
fn decide_table() {
    let two_thirds = RenewalPolicy::DEFAULT;
    let grace = RenewalPolicy {
        window_fraction: 2.0 / 3.0,
        grace_after_expiry_seconds: Some(600),
    };
    let anytime = RenewalPolicy {
        window_fraction: 0.0,
        grace_after_expiry_seconds: None,
    };
    let last_moment = RenewalPolicy {
        window_fraction: 1.0,
        grace_after_expiry_seconds: Some(u64::MAX),
    };
    let too_early = |at| Err(RenewalRefusal::TooEarly { opens_at_unix: at });
    let expired = |ended| {
        Err(RenewalRefusal::Expired {
            not_after_unix: NA,
            grace_ended_at_unix: ended,
        })
    };
    let table: Vec<Row> = vec![
        ("fresh", two_thirds, NB, NA, NB, too_early(NB + 2_000)),
        (
            "before issuance",
            two_thirds,
            NB,
            NA,
            NB - 10,
            too_early(NB + 2_000),
        ),
        (
            "one second early",
            two_thirds,
            NB,
            NA,
            NB + 1_999,
            too_early(NB + 2_000),
        ),
        ("window opens", two_thirds, NB, NA, NB + 2_000, Ok(())),
        ("at notAfter", two_thirds, NB, NA, NA, Ok(())),
        (
            "expired, no grace",
            two_thirds,
            NB,
            NA,
            NA + 1,
            expired(None),
        ),
        ("in grace", grace, NB, NA, NA + 600, Ok(())),
        (
            "grace over",
            grace,
            NB,
            NA,
            NA + 601,
            expired(Some(NA + 600)),
        ),
        ("anytime", anytime, NB, NA, NB, Ok(())),
        ("anytime, expired", anytime, NB, NA, NA + 1, expired(None)),
        (
            "only at the end",
            last_moment,
            NB,
            NA,
            NA - 1,
            too_early(NA),
        ),
        ("unbounded grace", last_moment, NB, NA, i64::MAX, Ok(())),
        (
            "empty validity",
            two_thirds,
            NA,
            NA,
            NA,
            Err(RenewalRefusal::InvalidValidity),
        ),
        (
            "reversed validity",
            two_thirds,
            NA,
            NB,
            NA,
            Err(RenewalRefusal::InvalidValidity),
        ),
        // Rounds up: 1/3 of 1000 s is 333.33 s.
        (
            "rounding",
            RenewalPolicy {
                window_fraction: 1.0 / 3.0,
                grace_after_expiry_seconds: None,
            },
            0,
            1_000,
            333,
            too_early(334),
        ),
        ("extreme times", anytime, i64::MIN, i64::MAX, 0, Ok(())),
    ];
    for (name, policy, not_before, not_after, now, expected) in table {
        assert_eq!(
            decide(&policy, not_before, not_after, now),
            expected,
            "{name}"
        );
    }
    for fraction in [f64::NAN, f64::INFINITY, -0.1, 1.01] {
        let policy = RenewalPolicy {
            window_fraction: fraction,
            grace_after_expiry_seconds: None,
        };
        assert!(!policy.is_valid());
        assert_eq!(
            decide(&policy, NB, NA, NA),
            Err(RenewalRefusal::InvalidPolicy),
            "{fraction}"
        );
    }
}

#[test]
fn lineage_and_subject_checks() {
    let ca = CaHierarchy::generate("renewal").unwrap();
    let (key, csr) = device_csr("dev-1");
    let cert = ca
        .sign_device_csr(&csr, "dev-1", 30, now())
        .unwrap()
        .certificate_der;

    // Same key, same subject: a plain reenroll.
    assert!(same_public_key(&cert, &csr).unwrap());
    assert!(same_subject(&cert, &csr).unwrap());

    // New key, same subject: a re-key.
    let (_, rekey) = device_csr("dev-1");
    assert!(!same_public_key(&cert, &rekey).unwrap());
    assert!(same_subject(&cert, &rekey).unwrap());

    // Same key, other subject.
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "dev-2");
    let other = params.serialize_request(&key).unwrap().der().to_vec();
    assert!(same_public_key(&cert, &other).unwrap());
    assert!(!same_subject(&cert, &other).unwrap());

    // An extra RDN is a different subject; a PrintableString CN is the same one.
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "dev-1");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Acme");
    let extra = params.serialize_request(&key).unwrap().der().to_vec();
    assert!(!same_subject(&cert, &extra).unwrap());
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        DnValue::PrintableString("dev-1".try_into().unwrap()),
    );
    let printable = params.serialize_request(&key).unwrap().der().to_vec();
    assert!(same_subject(&cert, &printable).unwrap());

    // Garbage is an error, not `false`.
    assert!(matches!(
        same_public_key(b"junk", &csr),
        Err(Error::InvalidCertificate { .. })
    ));
    assert!(matches!(
        same_subject(&cert, b"junk"),
        Err(Error::InvalidCsr { .. })
    ));
}

/// An openssl-made CSR on the device's own key is recognised as the same key and subject.
#[test]
fn openssl_reenroll_csr_matches() {
    let ca = CaHierarchy::generate("renewal interop").unwrap();
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
            "/CN=dev-ossl",
            "-outform",
            "DER",
            "-out",
            "first.der",
        ],
    );
    let first = std::fs::read(d.join("first.der")).unwrap();
    let cert = ca.sign_device_csr(&first, "dev-ossl", 30, now()).unwrap();
    write(d, "cert.pem", &cert.certificate_pem);
    // `openssl x509 -x509toreq` builds the reenroll request from the old certificate.
    openssl_ok(
        d,
        &[
            "x509",
            "-x509toreq",
            "-in",
            "cert.pem",
            "-signkey",
            "device.key",
            "-out",
            "renew.pem",
        ],
    );
    openssl_ok(
        d,
        &[
            "req",
            "-in",
            "renew.pem",
            "-outform",
            "DER",
            "-out",
            "renew.der",
        ],
    );
    let renew = std::fs::read(d.join("renew.der")).unwrap();
    assert!(same_public_key(&cert.certificate_der, &renew).unwrap());
    assert!(same_subject(&cert.certificate_der, &renew).unwrap());
}
