use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
    date_time_ymd,
};

use super::*;

/// 2025-01-01T00:00:00Z, inside every test certificate's validity.
const NOW: u64 = 1_735_689_600;
const DEVICE: &str = "dev-01";

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2030, 1, 1);
    p
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut p = params(cn);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn root(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let p = ca_params(cn, None);
        let der = p.self_signed(&key).unwrap().der().to_vec();
        Ca {
            der,
            issuer: Issuer::new(p, key),
        }
    }

    fn intermediate(&self, p: CertificateParams) -> Ca {
        let key = KeyPair::generate().unwrap();
        let der = p.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        Ca {
            der,
            issuer: Issuer::new(p, key),
        }
    }

    fn issue(&self, p: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &self.issuer).unwrap().der().to_vec()
    }

    /// A device certificate with EKU clientAuth.
    fn device(&self, cn: &str) -> Vec<u8> {
        self.issue(device_params(cn))
    }

    fn info(&self) -> super::super::CertificateInfo {
        Certificate::from_der(&self.der).unwrap().info().clone()
    }
}

fn device_params(cn: &str) -> CertificateParams {
    let mut p = params(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// root → intermediate (pathlen 0) → leaves.
struct Pki {
    root: Ca,
    intermediate: Ca,
}

impl Pki {
    fn new() -> Pki {
        let root = Ca::root("Contoso Root");
        let intermediate = root.intermediate(ca_params("Contoso Intermediate", Some(0)));
        Pki { root, intermediate }
    }

    /// The device presents leaf + intermediate, as SDKs do with a chain file.
    fn evidence(&self, leaf: Vec<u8>) -> X509Evidence {
        X509Evidence {
            registration_id: DEVICE.into(),
            leaf,
            chain: vec![self.intermediate.der.clone()],
        }
    }
}

fn signing_group(id: &str, ca: &Ca, enabled: bool) -> X509Group {
    X509Group {
        group_id: id.into(),
        certificates: vec![GroupCertificate::Signing(ca.der.clone())],
        enabled,
    }
}

fn ca_reference_group(id: &str, ca: &Ca, verified: bool) -> X509Group {
    X509Group {
        group_id: id.into(),
        certificates: vec![GroupCertificate::CaReference {
            name: format!("{id}-ca"),
            certificate: ca.der.clone(),
            verified,
        }],
        enabled: true,
    }
}

/// Groups only; the root is a verified instance CA.
fn groups(pki: &Pki, groups: Vec<X509Group>) -> X509Attestor {
    X509Attestor {
        individual: None,
        groups,
        verified_cas: vec![pki.root.der.clone()],
    }
}

fn matched(result: Result<AttestedIdentity, X509AttestationError>) -> EnrollmentRef {
    result.unwrap().matched
}

#[test]
fn group_on_the_root_accepts_a_chain_through_the_intermediate() {
    let pki = Pki::new();
    let leaf = pki.intermediate.device(DEVICE);
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);
    let identity = a.attest(&pki.evidence(leaf.clone()), NOW).unwrap();
    assert_eq!(
        identity,
        AttestedIdentity {
            registration_id: DEVICE.into(),
            mechanism: Mechanism::X509,
            matched: EnrollmentRef::Group("root".into()),
            certificate_info: Some(Certificate::from_der(&leaf).unwrap().info().clone()),
            signing_certificate_info: Some(pki.root.info()),
            expires_at: Some(1_893_456_000),
        }
    );

    // The device may send the root as well, and in any order.
    let mut with_root = pki.evidence(leaf);
    with_root.chain.insert(0, pki.root.der.clone());
    assert_eq!(
        matched(a.attest(&with_root, NOW)),
        EnrollmentRef::Group("root".into())
    );
}

#[test]
fn group_on_the_intermediate_beats_group_on_the_root() {
    let pki = Pki::new();
    let evidence = pki.evidence(pki.intermediate.device(DEVICE));
    for order in [
        vec![
            signing_group("root", &pki.root, true),
            signing_group("intermediate", &pki.intermediate, true),
        ],
        vec![
            signing_group("intermediate", &pki.intermediate, true),
            signing_group("root", &pki.root, true),
        ],
    ] {
        let identity = groups(&pki, order).attest(&evidence, NOW).unwrap();
        assert_eq!(
            identity.matched,
            EnrollmentRef::Group("intermediate".into())
        );
        assert_eq!(
            identity.signing_certificate_info,
            Some(pki.intermediate.info())
        );
    }
    // The intermediate's group applies even when the device sends only its leaf.
    let leaf_only = X509Evidence {
        chain: vec![],
        ..evidence
    };
    assert_eq!(
        matched(
            groups(
                &pki,
                vec![signing_group("intermediate", &pki.intermediate, true)]
            )
            .attest(&leaf_only, NOW)
        ),
        EnrollmentRef::Group("intermediate".into())
    );
}

#[test]
fn disabled_closest_group_refuses_even_if_the_root_group_is_enabled() {
    let pki = Pki::new();
    let evidence = pki.evidence(pki.intermediate.device(DEVICE));
    let a = groups(
        &pki,
        vec![
            signing_group("root", &pki.root, true),
            signing_group("intermediate", &pki.intermediate, false),
        ],
    );
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Disabled)
    );

    // Disabled root group, no intermediate group: refused as well.
    let a = groups(&pki, vec![signing_group("root", &pki.root, false)]);
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Disabled)
    );

    // Two groups on the same CA, one disabled: fail closed whatever the order.
    let a = groups(
        &pki,
        vec![
            ca_reference_group("on", &pki.root, true),
            signing_group("off", &pki.root, false),
        ],
    );
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Disabled)
    );
}

#[test]
fn disabled_is_only_revealed_for_a_valid_chain() {
    let pki = Pki::new();
    let mut expired = device_params(DEVICE);
    expired.not_before = date_time_ymd(2020, 1, 1);
    expired.not_after = date_time_ymd(2021, 1, 1);
    let evidence = pki.evidence(pki.intermediate.issue(expired));
    let a = groups(&pki, vec![signing_group("root", &pki.root, false)]);
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Chain(ChainError::Expired))
    );
}

#[test]
fn eku_is_required_if_present() {
    let pki = Pki::new();
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);

    let mut server_only = device_params(DEVICE);
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert_eq!(
        a.attest(&pki.evidence(pki.intermediate.issue(server_only)), NOW),
        Err(X509AttestationError::Chain(ChainError::RequiredEkuNotFound))
    );

    let mut both = device_params(DEVICE);
    both.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    assert!(
        a.attest(&pki.evidence(pki.intermediate.issue(both)), NOW)
            .is_ok()
    );

    let mut none = device_params(DEVICE);
    none.extended_key_usages = vec![];
    assert!(
        a.attest(&pki.evidence(pki.intermediate.issue(none)), NOW)
            .is_ok()
    );
}

#[test]
fn validity_is_checked_along_the_path() {
    let pki = Pki::new();
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);

    let mut expired = device_params(DEVICE);
    expired.not_before = date_time_ymd(2020, 1, 1);
    expired.not_after = date_time_ymd(2021, 1, 1);
    assert_eq!(
        a.attest(&pki.evidence(pki.intermediate.issue(expired)), NOW),
        Err(X509AttestationError::Chain(ChainError::Expired))
    );

    let mut future = device_params(DEVICE);
    future.not_before = date_time_ymd(2029, 1, 1);
    assert_eq!(
        a.attest(&pki.evidence(pki.intermediate.issue(future)), NOW),
        Err(X509AttestationError::Chain(ChainError::NotYetValid))
    );

    // A good leaf under an expired intermediate.
    let mut old = ca_params("Old Intermediate", Some(0));
    old.not_after = date_time_ymd(2024, 6, 1);
    let old = pki.root.intermediate(old);
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: old.device(DEVICE),
        chain: vec![old.der.clone()],
    };
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Chain(ChainError::Expired))
    );

    // The matched group certificate itself has expired (webpki does not check anchors).
    let b = groups(&pki, vec![signing_group("old", &old, true)]);
    assert_eq!(
        b.attest(&evidence, NOW),
        Err(X509AttestationError::Chain(ChainError::Expired))
    );
}

#[test]
fn name_constraints_are_enforced() {
    let root = Ca::root("Constrained Root");
    let mut constrained = ca_params("Constrained Intermediate", Some(0));
    constrained.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName("devices.example".into())],
        excluded_subtrees: vec![],
    });
    let intermediate = root.intermediate(constrained);
    let pki = Pki { root, intermediate };
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);

    let mut outside = device_params(DEVICE);
    outside.subject_alt_names = vec![SanType::DnsName("dev-01.other.example".try_into().unwrap())];
    assert_eq!(
        a.attest(&pki.evidence(pki.intermediate.issue(outside)), NOW),
        Err(X509AttestationError::Chain(
            ChainError::NameConstraintViolation
        ))
    );

    let mut inside = device_params(DEVICE);
    inside.subject_alt_names = vec![SanType::DnsName(
        "dev-01.devices.example".try_into().unwrap(),
    )];
    assert!(
        a.attest(&pki.evidence(pki.intermediate.issue(inside)), NOW)
            .is_ok()
    );

    // Constraints on the group certificate (the trust anchor) apply too.
    let b = groups(
        &pki,
        vec![signing_group("intermediate", &pki.intermediate, true)],
    );
    let mut outside = device_params(DEVICE);
    outside.subject_alt_names = vec![SanType::DnsName("dev-01.other.example".try_into().unwrap())];
    assert_eq!(
        b.attest(&pki.evidence(pki.intermediate.issue(outside)), NOW),
        Err(X509AttestationError::Chain(
            ChainError::NameConstraintViolation
        ))
    );
}

#[test]
fn common_name_must_be_the_registration_id() {
    let pki = Pki::new();
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);
    let mut evidence = pki.evidence(pki.intermediate.device(DEVICE));
    evidence.registration_id = "dev-02".into();
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::CnMismatch)
    );
    evidence.registration_id = "DEV-01".into();
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::CnMismatch)
    );

    let mut no_cn = device_params(DEVICE);
    no_cn.distinguished_name = DistinguishedName::new();
    no_cn
        .distinguished_name
        .push(DnType::OrganizationName, DEVICE);
    assert_eq!(
        a.attest(&pki.evidence(pki.intermediate.issue(no_cn)), NOW),
        Err(X509AttestationError::CnMismatch)
    );
}

#[test]
fn individual_enrollment_matches_a_self_signed_leaf_by_thumbprint() {
    let mut p = device_params(DEVICE);
    p.extended_key_usages = vec![];
    let leaf = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
    let leaf_der = leaf.der().to_vec();
    let info = Certificate::from_der(&leaf_der).unwrap().info().clone();
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: leaf_der.clone(),
        chain: vec![],
    };
    let individual = |primary: Option<ClientCertificate>, secondary, enabled| X509Attestor {
        individual: Some(X509Enrollment {
            primary,
            secondary,
            enabled,
        }),
        groups: vec![],
        verified_cas: vec![],
    };

    let sha1_colons = info
        .sha1_thumbprint
        .to_lowercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    for enrolled in [
        ClientCertificate::Der(leaf_der.clone()),
        ClientCertificate::Thumbprint(info.sha256_thumbprint.clone()),
        ClientCertificate::Thumbprint(info.sha256_thumbprint.to_lowercase()),
        ClientCertificate::Thumbprint(sha1_colons),
    ] {
        let identity = individual(Some(enrolled.clone()), None, true)
            .attest(&evidence, NOW)
            .unwrap_or_else(|e| panic!("{enrolled:?}: {e}"));
        assert_eq!(
            identity,
            AttestedIdentity {
                registration_id: DEVICE.into(),
                mechanism: Mechanism::X509,
                matched: EnrollmentRef::Individual(DEVICE.into()),
                certificate_info: Some(info.clone()),
                signing_certificate_info: None,
                expires_at: Some(1_893_456_000),
            }
        );
        // As the secondary certificate too.
        let other = ClientCertificate::Thumbprint("00".repeat(32));
        assert!(
            individual(Some(other), Some(enrolled), true)
                .attest(&evidence, NOW)
                .is_ok()
        );
    }

    let other = params(DEVICE)
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap();
    for wrong in [
        ClientCertificate::Der(other.der().to_vec()),
        ClientCertificate::Thumbprint("00".repeat(20)),
        ClientCertificate::Thumbprint(info.sha256_thumbprint[..62].into()),
        ClientCertificate::Thumbprint(String::new()),
    ] {
        assert_eq!(
            individual(Some(wrong), None, true).attest(&evidence, NOW),
            Err(X509AttestationError::CertificateMismatch)
        );
    }
    assert_eq!(
        individual(None, None, true).attest(&evidence, NOW),
        Err(X509AttestationError::CertificateMismatch)
    );

    let enrolled = Some(ClientCertificate::Der(leaf_der));
    assert_eq!(
        individual(enrolled.clone(), None, false).attest(&evidence, NOW),
        Err(X509AttestationError::Disabled)
    );
    assert_eq!(
        individual(enrolled.clone(), None, true).attest(&evidence, 1_900_000_000),
        Err(X509AttestationError::Expired)
    );
    assert_eq!(
        individual(enrolled, None, true).attest(&evidence, 1_600_000_000),
        Err(X509AttestationError::NotYetValid)
    );
}

#[test]
fn individual_enrollment_takes_precedence_over_groups() {
    let pki = Pki::new();
    let evidence = pki.evidence(pki.intermediate.device(DEVICE));
    let mut a = groups(&pki, vec![signing_group("root", &pki.root, true)]);
    a.individual = Some(X509Enrollment {
        primary: Some(ClientCertificate::Der(pki.intermediate.device(DEVICE))),
        secondary: None,
        enabled: true,
    });
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::CertificateMismatch)
    );
    a.individual = Some(X509Enrollment {
        primary: Some(ClientCertificate::Der(evidence.leaf.clone())),
        secondary: None,
        enabled: true,
    });
    let identity = a.attest(&evidence, NOW).unwrap();
    assert_eq!(identity.matched, EnrollmentRef::Individual(DEVICE.into()));
    assert_eq!(identity.signing_certificate_info, None);
}

#[test]
fn unverified_cas_are_refused() {
    let pki = Pki::new();
    let evidence = pki.evidence(pki.intermediate.device(DEVICE));

    let a = groups(&pki, vec![ca_reference_group("g", &pki.root, false)]);
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::UnverifiedCa)
    );
    let a = groups(&pki, vec![ca_reference_group("g", &pki.root, true)]);
    assert_eq!(
        matched(a.attest(&evidence, NOW)),
        EnrollmentRef::Group("g".into())
    );

    // A CA reference counts as verified even if verified_cas does not list it.
    let mut a = groups(&pki, vec![ca_reference_group("g", &pki.intermediate, true)]);
    a.verified_cas.clear();
    assert!(a.attest(&evidence, NOW).is_ok());

    // A signing certificate must be verified itself or roll up to a verified CA.
    let mut a = groups(&pki, vec![signing_group("g", &pki.intermediate, true)]);
    a.verified_cas.clear();
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::UnverifiedCa)
    );
    a.verified_cas = vec![pki.intermediate.der.clone()];
    assert!(a.attest(&evidence, NOW).is_ok());
    // The intermediate is signed by the verified root.
    a.verified_cas = vec![pki.root.der.clone()];
    assert!(a.attest(&evidence, NOW).is_ok());
    // A verified CA unrelated to the chain does not help.
    a.verified_cas = vec![Ca::root("Contoso Root").der];
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::UnverifiedCa)
    );
}

#[test]
fn signing_certificate_rolls_up_through_the_presented_chain() {
    // root → issuing CA → sub CA → leaf; the group holds the sub CA, only the root is
    // verified, and the device presents sub CA and issuing CA.
    let root = Ca::root("Root");
    let issuing = root.intermediate(ca_params("Issuing CA", Some(1)));
    let sub = issuing.intermediate(ca_params("Sub CA", Some(0)));
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: sub.device(DEVICE),
        chain: vec![issuing.der.clone(), sub.der.clone()],
    };
    let mut a = X509Attestor {
        individual: None,
        groups: vec![signing_group("sub", &sub, true)],
        verified_cas: vec![root.der.clone()],
    };
    assert_eq!(
        matched(a.attest(&evidence, NOW)),
        EnrollmentRef::Group("sub".into())
    );
    // Without the issuing CA in the chain, the sub CA does not roll up to the root.
    let short = X509Evidence {
        chain: vec![sub.der.clone()],
        ..evidence.clone()
    };
    assert_eq!(
        a.attest(&short, NOW),
        Err(X509AttestationError::UnverifiedCa)
    );
    // Verifying the issuing CA instead works with the short chain.
    a.verified_cas = vec![issuing.der.clone()];
    assert!(a.attest(&short, NOW).is_ok());
}

#[test]
fn unknown_issuers_are_refused() {
    let pki = Pki::new();
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);

    // A device from another PKI.
    let other = Pki::new();
    assert_eq!(
        a.attest(&other.evidence(other.intermediate.device(DEVICE)), NOW),
        Err(X509AttestationError::UnknownIssuer)
    );
    // The intermediate is missing from the presented chain.
    let leaf_only = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: pki.intermediate.device(DEVICE),
        chain: vec![],
    };
    assert_eq!(
        a.attest(&leaf_only, NOW),
        Err(X509AttestationError::UnknownIssuer)
    );
    // An impostor intermediate with the same name but another key, signed by another root.
    let impostor = Ca::root("Evil Root").intermediate(ca_params("Contoso Intermediate", Some(0)));
    let forged = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: impostor.device(DEVICE),
        chain: vec![impostor.der.clone()],
    };
    assert_eq!(
        a.attest(&forged, NOW),
        Err(X509AttestationError::UnknownIssuer)
    );
    // A group holding the genuine intermediate does not accept the impostor's leaf.
    let b = groups(
        &pki,
        vec![signing_group("intermediate", &pki.intermediate, true)],
    );
    assert_eq!(
        b.attest(&forged, NOW),
        Err(X509AttestationError::UnknownIssuer)
    );
    // No groups at all.
    assert_eq!(
        groups(&pki, vec![]).attest(&pki.evidence(pki.intermediate.device(DEVICE)), NOW),
        Err(X509AttestationError::UnknownIssuer)
    );
}

/// The walk compares names only (webpki verifies each signature once): a group certificate that
/// merely has the issuer's name is passed over, and the real issuer further up decides.
#[test]
fn a_group_certificate_with_the_issuers_name_but_another_key_is_passed_over() {
    let pki = Pki::new();
    let lookalike = Ca::root("Other Root").intermediate(ca_params("Contoso Intermediate", Some(0)));
    let evidence = pki.evidence(pki.intermediate.device(DEVICE));
    // Enabled or not, the look-alike is not an issuer: it neither admits nor refuses.
    for lookalike_enabled in [true, false] {
        let a = groups(
            &pki,
            vec![
                signing_group("lookalike", &lookalike, lookalike_enabled),
                signing_group("root", &pki.root, true),
            ],
        );
        assert_eq!(
            matched(a.attest(&evidence, NOW)),
            EnrollmentRef::Group("root".into())
        );
    }
}

#[test]
fn a_ca_certificate_is_not_a_device_certificate() {
    let pki = Pki::new();
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);
    let ca_leaf = pki.root.issue(ca_params(DEVICE, Some(0)));
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: ca_leaf,
        chain: vec![],
    };
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Chain(ChainError::CaUsedAsEndEntity))
    );
}

#[test]
fn garbage_and_oversized_input_is_refused() {
    let pki = Pki::new();
    let a = groups(&pki, vec![signing_group("root", &pki.root, true)]);
    let good = pki.evidence(pki.intermediate.device(DEVICE));

    let mut empty = good.clone();
    empty.leaf.clear();
    assert_eq!(
        a.attest(&empty, NOW),
        Err(X509AttestationError::BadCertificate(X509Error::Empty))
    );
    let mut bad_chain = good.clone();
    bad_chain.chain.push(b"junk".to_vec());
    assert!(matches!(
        a.attest(&bad_chain, NOW),
        Err(X509AttestationError::BadCertificate(_))
    ));
    let mut long = good.clone();
    long.chain = vec![pki.intermediate.der.clone(); MAX_CHAIN_LEN + 1];
    assert_eq!(
        a.attest(&long, NOW),
        Err(X509AttestationError::ChainTooLong)
    );
    // Repeated certificates up to the limit are fine.
    long.chain.truncate(MAX_CHAIN_LEN);
    assert!(a.attest(&long, NOW).is_ok());

    // Garbage group certificates are skipped, not fatal.
    let mut c = a.clone();
    c.groups.insert(
        0,
        X509Group {
            group_id: "broken".into(),
            certificates: vec![GroupCertificate::Signing(b"junk".to_vec())],
            enabled: true,
        },
    );
    assert_eq!(
        matched(c.attest(&good, NOW)),
        EnrollmentRef::Group("root".into())
    );

    // Every truncation of the leaf is refused without panicking.
    for end in 0..good.leaf.len() {
        let mut cut = good.clone();
        cut.leaf.truncate(end);
        assert!(a.attest(&cut, NOW).is_err());
    }
    // Flipped bytes anywhere in the leaf never panic, and never verify if the signed part
    // changed (a flip in the unsigned outer structure may still parse to the same TBS).
    for i in 0..good.leaf.len() {
        let mut flipped = good.clone();
        flipped.leaf[i] ^= 0x01;
        let _ = a.attest(&flipped, NOW);
    }
}

#[test]
fn a_group_certificate_must_be_a_ca() {
    // A device certificate uploaded as a group's signing certificate issues nothing.
    let pki = Pki::new();
    let key = KeyPair::generate().unwrap();
    let not_ca = params("Not A CA").self_signed(&key).unwrap();
    let issuer = Issuer::new(params("Not A CA"), key);
    let leaf = device_params(DEVICE)
        .signed_by(&KeyPair::generate().unwrap(), &issuer)
        .unwrap();
    let mut a = groups(
        &pki,
        vec![X509Group {
            group_id: "g".into(),
            certificates: vec![GroupCertificate::Signing(not_ca.der().to_vec())],
            enabled: true,
        }],
    );
    a.verified_cas = vec![not_ca.der().to_vec()];
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: leaf.der().to_vec(),
        chain: vec![],
    };
    assert_eq!(
        a.attest(&evidence, NOW),
        Err(X509AttestationError::Chain(ChainError::EndEntityUsedAsCa))
    );
}

#[test]
fn individual_enrollment_refuses_a_server_only_certificate() {
    let mut p = device_params(DEVICE);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
    let leaf_der = leaf.der().to_vec();
    let attestor = X509Attestor {
        individual: Some(X509Enrollment {
            primary: Some(ClientCertificate::Der(leaf_der.clone())),
            secondary: None,
            enabled: true,
        }),
        groups: vec![],
        verified_cas: vec![],
    };
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: leaf_der,
        chain: vec![],
    };
    assert_eq!(
        attestor.attest(&evidence, NOW),
        Err(X509AttestationError::Chain(ChainError::RequiredEkuNotFound))
    );
}

/// One EKU rule everywhere: what `Certificate::allows_client_auth` says (the hub and EST use
/// it) is what an individual enrollment and a group's path validation decide.
#[test]
fn the_eku_rule_is_the_same_for_individuals_groups_and_the_hub() {
    use ExtendedKeyUsagePurpose::{Any, ClientAuth, ServerAuth};
    let pki = Pki::new();
    let group = groups(&pki, vec![signing_group("root", &pki.root, true)]);
    for (ekus, allowed) in [
        (vec![], true),
        (vec![ClientAuth], true),
        (vec![ServerAuth, ClientAuth], true),
        (vec![ServerAuth], false),
        (vec![Any], false),
    ] {
        let mut p = device_params(DEVICE);
        p.extended_key_usages = ekus.clone();
        let leaf_der = pki.intermediate.issue(p);
        let individual = X509Attestor {
            individual: Some(X509Enrollment {
                primary: Some(ClientCertificate::Der(leaf_der.clone())),
                secondary: None,
                enabled: true,
            }),
            groups: vec![],
            verified_cas: vec![],
        };
        let evidence = pki.evidence(leaf_der.clone());
        let rule = Certificate::from_der(&leaf_der)
            .unwrap()
            .allows_client_auth();
        assert_eq!(rule, allowed, "allows_client_auth for {ekus:?}");
        assert_eq!(
            group.attest(&evidence, NOW).is_ok(),
            allowed,
            "group path validation for {ekus:?}"
        );
        assert_eq!(
            individual.attest(&evidence, NOW).is_ok(),
            allowed,
            "individual enrollment for {ekus:?}"
        );
    }
}
