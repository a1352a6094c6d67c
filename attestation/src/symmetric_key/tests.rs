use super::*;

// Test vectors from the DPS protocol notes, §3.1.
const GROUP_KEY: &str = "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=";
const DEVICE_KEY: &str = "3wWY86l94eFKP6eOuPmct7p/HxH8AVogU/exUD3ZtQc=";
const SE: u64 = 1_700_000_000;
const SR_UPPER: &str = "0ne00000001%2Fregistrations%2Fdev-01";
const SR_LOWER: &str = "0ne00000001%2fregistrations%2fdev-01";
const SIG_UPPER: &str = "Dx77QTYGUJ57tcUano6mvJQSu9nSqmxl9DkSEeg4lZc=";
const SIG_LOWER: &str = "3FsbINzA0+w8+q1mLpDPnnkTIxsihO4tSSjCmZm+Mxw=";
const NOW: u64 = SE - 600;

fn enc(s: &str) -> String {
    utf8_percent_encode(s, ENCODE).to_string()
}

/// Lower-cases the hex digits of `%XX` escapes only, as the C SDK's encoder writes them.
fn lower_hex(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        out.push('%');
        out.push_str(&rest[i + 1..i + 3].to_ascii_lowercase());
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

#[test]
fn derive_device_key_vector() {
    assert_eq!(derive_device_key(GROUP_KEY, "dev-01").unwrap(), DEVICE_KEY);
    assert_ne!(derive_device_key(GROUP_KEY, "dev-02").unwrap(), DEVICE_KEY);
    assert_eq!(
        derive_device_key("***", "dev-01"),
        Err(SasError::InvalidKey)
    );
    assert_eq!(derive_device_key("", "dev-01"), Err(SasError::InvalidKey));
}

#[test]
fn sign_matches_the_upper_case_vector() {
    let token = sign("0ne00000001/registrations/dev-01", DEVICE_KEY, SE, None).unwrap();
    assert_eq!(
        token,
        format!(
            "SharedAccessSignature sr={SR_UPPER}&sig={}&se={SE}",
            enc(SIG_UPPER)
        )
    );
    let parsed = SasToken::parse(&token).unwrap();
    assert_eq!(parsed.sr, SR_UPPER);
    assert_eq!(parsed.sig, SIG_UPPER);
    assert_eq!(parsed.se, SE);
    assert_eq!(parsed.skn, None);
    assert_eq!(verify(&parsed, &[DEVICE_KEY], NOW), Ok(0));
}

#[test]
fn lower_case_encoding_verifies_with_its_own_signature() {
    // As the C SDK sends it: lower-case hex, `skn=registration`, fields reordered.
    let header = format!(
        "SharedAccessSignature se={SE}&skn=registration&sig={}&sr={SR_LOWER}",
        lower_hex(&enc(SIG_LOWER))
    );
    let token = SasToken::parse(&header).unwrap();
    assert_eq!(token.sr, SR_LOWER);
    assert_eq!(token.sig, SIG_LOWER);
    assert_eq!(token.skn.as_deref(), Some("registration"));
    assert_eq!(verify(&token, &[DEVICE_KEY], NOW), Ok(0));
    assert_eq!(
        token.resource_decoded().unwrap(),
        "0ne00000001/registrations/dev-01"
    );

    // Same signature over the other spelling does not verify: sr is signed as received.
    let swapped = SasToken {
        sr: SR_UPPER.into(),
        ..token
    };
    assert_eq!(
        verify(&swapped, &[DEVICE_KEY], NOW),
        Err(SasError::SignatureMismatch)
    );
}

#[test]
fn verify_reports_the_matching_key_index_and_skips_bad_keys() {
    let token = SasToken::parse(&sign("s/registrations/d", DEVICE_KEY, SE, None).unwrap()).unwrap();
    let other = derive_device_key(GROUP_KEY, "other").unwrap();
    assert_eq!(verify(&token, &[&other, DEVICE_KEY], NOW), Ok(1));
    assert_eq!(verify(&token, &["not base64!", "", DEVICE_KEY], NOW), Ok(2));
    assert_eq!(
        verify(&token, &[&other], NOW),
        Err(SasError::SignatureMismatch)
    );
    assert_eq!(
        verify(&token, &[&other, "%%%"], NOW),
        Err(SasError::SignatureMismatch)
    );
    assert_eq!(verify(&token, &[], NOW), Err(SasError::NoUsableKey));
    assert_eq!(
        verify(&token, &["%%%", ""], NOW),
        Err(SasError::NoUsableKey)
    );
}

#[test]
fn expiry_with_skew() {
    let token = SasToken::parse(&sign("s/registrations/d", DEVICE_KEY, SE, None).unwrap()).unwrap();
    assert_eq!(verify(&token, &[DEVICE_KEY], 0), Ok(0));
    assert_eq!(verify(&token, &[DEVICE_KEY], SE), Ok(0));
    assert_eq!(
        verify(&token, &[DEVICE_KEY], SE + CLOCK_SKEW_SECS - 1),
        Ok(0)
    );
    assert_eq!(
        verify(&token, &[DEVICE_KEY], SE + CLOCK_SKEW_SECS),
        Err(SasError::Expired)
    );
    assert_eq!(
        verify(&token, &[DEVICE_KEY], u64::MAX),
        Err(SasError::Expired)
    );
    // An expired forgery is reported as a forgery, not as expired.
    let other = derive_device_key(GROUP_KEY, "other").unwrap();
    assert_eq!(
        verify(&token, &[&other], u64::MAX),
        Err(SasError::SignatureMismatch)
    );
    // se = u64::MAX does not overflow.
    let forever = SasToken::parse(&sign("r", DEVICE_KEY, u64::MAX, None).unwrap()).unwrap();
    assert_eq!(verify(&forever, &[DEVICE_KEY], u64::MAX - 1), Ok(0));
}

#[test]
fn tampering_is_detected() {
    let token = SasToken::parse(&sign("s/registrations/d", DEVICE_KEY, SE, None).unwrap()).unwrap();
    let later = SasToken {
        se: SE + 1,
        ..token.clone()
    };
    assert_eq!(
        verify(&later, &[DEVICE_KEY], NOW),
        Err(SasError::SignatureMismatch)
    );
    let elsewhere = SasToken {
        sr: "s%2Fregistrations%2Fe".into(),
        ..token.clone()
    };
    assert_eq!(
        verify(&elsewhere, &[DEVICE_KEY], NOW),
        Err(SasError::SignatureMismatch)
    );
    let short = SasToken {
        sig: "AAAA".into(),
        ..token.clone()
    };
    assert_eq!(
        verify(&short, &[DEVICE_KEY], NOW),
        Err(SasError::SignatureMismatch)
    );
    let garbage = SasToken {
        sig: "!!".into(),
        ..token
    };
    assert!(matches!(
        verify(&garbage, &[DEVICE_KEY], NOW),
        Err(SasError::Malformed(_))
    ));
}

#[test]
fn sign_with_key_name_and_odd_characters() {
    let token = sign(
        "scope/registrations/a b+c/ü",
        DEVICE_KEY,
        5,
        Some("registration"),
    )
    .unwrap();
    assert!(token.ends_with("&se=5&skn=registration"), "{token}");
    assert!(
        token.contains("sr=scope%2Fregistrations%2Fa%20b%2Bc%2F%C3%BC&"),
        "{token}"
    );
    let parsed = SasToken::parse(&token).unwrap();
    assert_eq!(
        parsed.resource_decoded().unwrap(),
        "scope/registrations/a b+c/ü"
    );
    assert_eq!(verify(&parsed, &[DEVICE_KEY], 0), Ok(0));
    assert_eq!(sign("r", "nope!", 1, None), Err(SasError::InvalidKey));
    let unreserved = sign("Az09-._~", DEVICE_KEY, 1, Some("k y")).unwrap();
    assert!(unreserved.contains("sr=Az09-._~&"));
    assert!(unreserved.ends_with("&skn=k%20y"));
}

#[test]
fn parse_accepts_variants() {
    let sig = enc(SIG_UPPER);
    let plain = format!("sr={SR_UPPER}&sig={sig}&se={SE}");
    let expected = SasToken {
        sr: SR_UPPER.into(),
        sig: SIG_UPPER.into(),
        se: SE,
        skn: None,
    };
    for header in [
        plain.clone(),
        format!("SharedAccessSignature {plain}"),
        format!("sharedaccesssignature   {plain}"),
        format!("  SharedAccessSignature\t{plain}  "),
        format!("{plain}&"),
        format!("&{plain}&&"),
        format!("{plain}&foo=bar&x="),
        format!("se={SE}&sig={sig}&sr={SR_UPPER}"),
    ] {
        assert_eq!(SasToken::parse(&header).unwrap(), expected, "{header}");
    }
    assert_eq!(
        SasToken::parse(&format!("{plain}&skn="))
            .unwrap()
            .skn
            .as_deref(),
        Some("")
    );
    assert_eq!(SasToken::parse(&format!("{plain}&se0=1")).unwrap().se, SE);
    // An unencoded signature (raw `+`, `/`, `=`) is fine too: only %XX is decoded.
    assert_eq!(
        SasToken::parse(&format!("sr=r&sig={SIG_LOWER}&se=1"))
            .unwrap()
            .sig,
        SIG_LOWER
    );
    assert_eq!(SasToken::parse("sr=r&sig=&se=0").unwrap().se, 0);
}

#[test]
fn parse_rejects_with_typed_errors() {
    let sig = enc(SIG_UPPER);
    let cases: Vec<(String, SasError)> = vec![
        (String::new(), SasError::MissingField("sr")),
        (
            "SharedAccessSignature".into(),
            SasError::Malformed("no space after the scheme"),
        ),
        (
            "SharedAccessSignature ".into(),
            SasError::Malformed("no space after the scheme"),
        ),
        (
            format!("SharedAccessSignaturesr=r&sig={sig}&se=1"),
            SasError::Malformed("no space after the scheme"),
        ),
        (format!("sig={sig}&se=1"), SasError::MissingField("sr")),
        ("sr=r&se=1".into(), SasError::MissingField("sig")),
        (format!("sr=r&sig={sig}"), SasError::MissingField("se")),
        (
            format!("sr=&sig={sig}&se=1"),
            SasError::Malformed("sr is empty"),
        ),
        (
            format!("sr=r&sr=q&sig={sig}&se=1"),
            SasError::Malformed("repeated field"),
        ),
        (
            format!("sr=r&sig={sig}&se=1&se=2"),
            SasError::Malformed("repeated field"),
        ),
        (
            format!("sr=r&sig={sig}&se"),
            SasError::Malformed("field without `=`"),
        ),
        (
            format!("sr=r&sig={sig}&se=-1"),
            SasError::Malformed("se is not a decimal number"),
        ),
        (
            format!("sr=r&sig={sig}&se=+1"),
            SasError::Malformed("se is not a decimal number"),
        ),
        (
            format!("sr=r&sig={sig}&se=01"),
            SasError::Malformed("se is not a decimal number"),
        ),
        (
            format!("sr=r&sig={sig}&se=1.5"),
            SasError::Malformed("se is not a decimal number"),
        ),
        (
            format!("sr=r&sig={sig}&se="),
            SasError::Malformed("se is not a decimal number"),
        ),
        (
            format!("sr=r&sig={sig}&se=18446744073709551616"),
            SasError::Malformed("se is out of range"),
        ),
        (
            "sr=r&sig=abc!&se=1".into(),
            SasError::Malformed("sig is not base64"),
        ),
        (
            "sr=r&sig=%FF%FE&se=1".into(),
            SasError::Malformed("sig is not UTF-8"),
        ),
        (
            format!("sr=r&sig={sig}&se=1&skn=%C3%28"),
            SasError::Malformed("skn is not UTF-8"),
        ),
    ];
    for (header, error) in cases {
        assert_eq!(SasToken::parse(&header), Err(error), "{header:?}");
    }
}

#[test]
fn parse_never_panics_on_garbage() {
    let token = sign(
        "0ne00000001/registrations/dev-01",
        DEVICE_KEY,
        SE,
        Some("registration"),
    )
    .unwrap();
    // Every prefix, every char-boundary suffix, and some hostile strings.
    for end in 0..=token.len() {
        let _ = SasToken::parse(&token[..end]);
        let _ = SasToken::parse(&token[end..]);
    }
    for header in [
        "é",
        "SharedAccessSignatureé",
        "Shared",
        "ÉharedAccessSignature sr=a",
        "%",
        "&&&&",
        "===",
        "sr=%&sig=%&se=%",
        "sr=%zz&sig=AAAA&se=1",
        "\u{0}\u{0}",
        "SharedAccessSignature\u{a0}sr=r",
    ] {
        if let Ok(t) = SasToken::parse(header) {
            let _ = t.resource_decoded();
            let _ = verify(&t, &[DEVICE_KEY], NOW);
        }
    }
}

#[test]
fn resource_helpers() {
    let token = SasToken::parse(&format!("sr={SR_LOWER}&sig=AAAA&se=1")).unwrap();
    assert!(token.is_for_registration("0ne00000001", "dev-01"));
    assert!(token.is_for_registration("0NE00000001", "DEV-01"));
    assert!(!token.is_for_registration("0ne00000001", "dev-02"));
    assert!(!token.is_for_registration("0ne00000002", "dev-01"));
    assert_eq!(registration_resource("s", "r"), "s/registrations/r");
    let bad = SasToken {
        sr: "%C3%28".into(),
        ..token.clone()
    };
    assert!(bad.resource_decoded().is_err());
    assert!(!bad.is_for_registration("a", "b"));

    let with = |skn: Option<&str>| SasToken {
        skn: skn.map(Into::into),
        ..token.clone()
    };
    assert!(with(None).key_name_is_acceptable());
    assert!(with(Some("")).key_name_is_acceptable());
    assert!(with(Some("registration")).key_name_is_acceptable());
    assert!(!with(Some("iothubowner")).key_name_is_acceptable());
}

#[test]
fn generated_keys_are_valid_and_distinct() {
    let a = generate_key().unwrap();
    let b = generate_key().unwrap();
    assert_ne!(a, b);
    assert_eq!(STANDARD.decode(&a).unwrap().len(), 64);
    assert_eq!(validate_key(&a), Ok(()));
}

#[test]
fn validate_key_limits() {
    assert_eq!(validate_key(&STANDARD.encode([1u8; 16])), Ok(()));
    assert_eq!(validate_key(&STANDARD.encode([1u8; 64])), Ok(()));
    assert_eq!(validate_key(DEVICE_KEY), Ok(()));
    assert_eq!(
        validate_key(&STANDARD.encode([1u8; 15])),
        Err(KeyError::InvalidLength { len: 15 })
    );
    assert_eq!(
        validate_key(&STANDARD.encode([1u8; 65])),
        Err(KeyError::InvalidLength { len: 65 })
    );
    assert_eq!(validate_key(""), Err(KeyError::InvalidLength { len: 0 }));
    assert_eq!(validate_key("not base64!"), Err(KeyError::NotBase64));
    // Unpadded and URL-safe alphabets are not what Azure issues.
    assert_eq!(
        validate_key(DEVICE_KEY.trim_end_matches('=')),
        Err(KeyError::NotBase64)
    );
    assert_eq!(
        validate_key(&DEVICE_KEY.replace('/', "_")),
        Err(KeyError::NotBase64)
    );
}

// --- SymmetricKeyAttestor ---

const SCOPE: &str = "0ne00000001";

fn evidence(header: &str, registration_id: &str) -> SasEvidence {
    SasEvidence {
        registration_id: registration_id.into(),
        token: SasToken::parse(header).unwrap(),
    }
}

/// The upper-case spec vector, as the Python SDK sends it for `dev-01`.
fn vector_evidence() -> SasEvidence {
    evidence(
        &format!(
            "SharedAccessSignature sr={SR_UPPER}&sig={}&se={SE}",
            enc(SIG_UPPER)
        ),
        "dev-01",
    )
}

fn group(id: &str, primary: &str, enabled: bool) -> SymmetricKeyGroup {
    SymmetricKeyGroup {
        group_id: id.into(),
        primary_key: primary.into(),
        secondary_key: generate_key().unwrap(),
        enabled,
    }
}

fn attestor(
    individual: Option<SymmetricKeyEnrollment>,
    groups: Vec<SymmetricKeyGroup>,
) -> SymmetricKeyAttestor {
    SymmetricKeyAttestor {
        id_scope: SCOPE.into(),
        individual,
        groups,
    }
}

#[test]
fn attestor_group_match_with_the_spec_vector() {
    let other = generate_key().unwrap();
    let a = attestor(
        None,
        vec![
            group("other", &other, true),
            group("contoso", GROUP_KEY, true),
        ],
    );
    let identity = a.attest(&vector_evidence(), NOW).unwrap();
    assert_eq!(
        identity,
        AttestedIdentity {
            registration_id: "dev-01".into(),
            mechanism: Mechanism::SymmetricKey,
            matched: EnrollmentRef::Group("contoso".into()),
            certificate_info: None,
            signing_certificate_info: None,
            expires_at: Some(SE),
        }
    );

    // The C SDK's spelling (lower-case hex, skn=registration) matches the same group.
    let c_sdk = evidence(
        &format!(
            "SharedAccessSignature sr={SR_LOWER}&sig={}&se={SE}&skn=registration",
            lower_hex(&enc(SIG_LOWER))
        ),
        "dev-01",
    );
    assert_eq!(
        a.attest(&c_sdk, NOW).unwrap().matched,
        EnrollmentRef::Group("contoso".into())
    );
}

#[test]
fn attestor_group_secondary_key_matches() {
    let mut g = group("contoso", &generate_key().unwrap(), true);
    g.secondary_key = GROUP_KEY.into();
    let a = attestor(None, vec![g]);
    assert_eq!(
        a.attest(&vector_evidence(), NOW).unwrap().matched,
        EnrollmentRef::Group("contoso".into())
    );
}

#[test]
fn attestor_individual_primary_and_secondary() {
    let primary = SymmetricKeyEnrollment {
        primary_key: DEVICE_KEY.into(),
        secondary_key: generate_key().unwrap(),
        enabled: true,
    };
    let a = attestor(Some(primary.clone()), vec![]);
    let identity = a.attest(&vector_evidence(), NOW).unwrap();
    assert_eq!(identity.matched, EnrollmentRef::Individual("dev-01".into()));
    assert_eq!(identity.expires_at, Some(SE));

    let secondary = SymmetricKeyEnrollment {
        primary_key: generate_key().unwrap(),
        secondary_key: DEVICE_KEY.into(),
        enabled: true,
    };
    let a = attestor(Some(secondary), vec![]);
    assert_eq!(
        a.attest(&vector_evidence(), NOW).unwrap().matched,
        EnrollmentRef::Individual("dev-01".into())
    );
}

#[test]
fn attestor_individual_takes_precedence_over_groups() {
    // The group would match, but an individual enrollment for dev-01 exists with other keys.
    let individual = SymmetricKeyEnrollment {
        primary_key: generate_key().unwrap(),
        secondary_key: generate_key().unwrap(),
        enabled: true,
    };
    let a = attestor(Some(individual), vec![group("contoso", GROUP_KEY, true)]);
    assert_eq!(
        a.attest(&vector_evidence(), NOW),
        Err(SymmetricKeyAttestationError::Unauthorized)
    );
}

#[test]
fn attestor_disabled_matches_refuse_distinctly() {
    let individual = SymmetricKeyEnrollment {
        primary_key: DEVICE_KEY.into(),
        secondary_key: DEVICE_KEY.into(),
        enabled: false,
    };
    assert_eq!(
        attestor(Some(individual), vec![]).attest(&vector_evidence(), NOW),
        Err(SymmetricKeyAttestationError::Disabled)
    );
    assert_eq!(
        attestor(None, vec![group("contoso", GROUP_KEY, false)]).attest(&vector_evidence(), NOW),
        Err(SymmetricKeyAttestationError::Disabled)
    );
    // Two groups share the key and one is disabled: refuse whatever the order.
    for groups in [
        vec![group("a", GROUP_KEY, true), group("b", GROUP_KEY, false)],
        vec![group("b", GROUP_KEY, false), group("a", GROUP_KEY, true)],
    ] {
        assert_eq!(
            attestor(None, groups).attest(&vector_evidence(), NOW),
            Err(SymmetricKeyAttestationError::Disabled)
        );
    }
    // A disabled group that does not match changes nothing.
    let a = attestor(
        None,
        vec![
            group("off", &generate_key().unwrap(), false),
            group("on", GROUP_KEY, true),
        ],
    );
    assert_eq!(
        a.attest(&vector_evidence(), NOW).unwrap().matched,
        EnrollmentRef::Group("on".into())
    );
    // Two enabled groups sharing the key: the first in order wins.
    let a = attestor(
        None,
        vec![
            group("first", GROUP_KEY, true),
            group("second", GROUP_KEY, true),
        ],
    );
    assert_eq!(
        a.attest(&vector_evidence(), NOW).unwrap().matched,
        EnrollmentRef::Group("first".into())
    );
}

#[test]
fn attestor_refusals() {
    let a = attestor(None, vec![group("contoso", GROUP_KEY, true)]);
    // No enrollment at all, or only non-matching groups.
    assert_eq!(
        attestor(None, vec![]).attest(&vector_evidence(), NOW),
        Err(SymmetricKeyAttestationError::Unauthorized)
    );
    assert_eq!(
        attestor(None, vec![group("x", &generate_key().unwrap(), true)])
            .attest(&vector_evidence(), NOW),
        Err(SymmetricKeyAttestationError::Unauthorized)
    );
    // Groups with unusable keys are skipped, not fatal.
    assert_eq!(
        attestor(
            None,
            vec![
                SymmetricKeyGroup {
                    group_id: "broken".into(),
                    primary_key: "***".into(),
                    secondary_key: String::new(),
                    enabled: true,
                },
                group("contoso", GROUP_KEY, true),
            ]
        )
        .attest(&vector_evidence(), NOW)
        .unwrap()
        .matched,
        EnrollmentRef::Group("contoso".into())
    );
    // Expired (authentic) token.
    assert_eq!(
        a.attest(&vector_evidence(), SE + CLOCK_SKEW_SECS),
        Err(SymmetricKeyAttestationError::Expired)
    );
    // Another device's registration id: the resource does not match.
    let mut other_device = vector_evidence();
    other_device.registration_id = "dev-02".into();
    assert_eq!(
        a.attest(&other_device, NOW),
        Err(SymmetricKeyAttestationError::WrongResource)
    );
    // Another ID scope.
    let mut other_scope = a.clone();
    other_scope.id_scope = "0ne00000002".into();
    assert_eq!(
        other_scope.attest(&vector_evidence(), NOW),
        Err(SymmetricKeyAttestationError::WrongResource)
    );
    // Registration id and scope compare case-insensitively.
    let mut upper = vector_evidence();
    upper.registration_id = "DEV-01".into();
    let mut upper_scope = a.clone();
    upper_scope.id_scope = SCOPE.to_uppercase();
    // The derived key is over the claimed id, so the upper-case id derives another key.
    assert_eq!(
        upper_scope.attest(&upper, NOW),
        Err(SymmetricKeyAttestationError::Unauthorized)
    );
    assert!(upper_scope.attest(&vector_evidence(), NOW).is_ok());
    // skn other than absent, empty or `registration`.
    let mut wrong_skn = vector_evidence();
    wrong_skn.token.skn = Some("iothubowner".into());
    assert_eq!(
        a.attest(&wrong_skn, NOW),
        Err(SymmetricKeyAttestationError::KeyName)
    );
    let mut empty_skn = vector_evidence();
    empty_skn.token.skn = Some(String::new());
    assert!(a.attest(&empty_skn, NOW).is_ok());
    // Tampered signature or expiry.
    let mut tampered = vector_evidence();
    tampered.token.se += 1;
    assert_eq!(
        a.attest(&tampered, NOW),
        Err(SymmetricKeyAttestationError::Unauthorized)
    );
    let mut garbage = vector_evidence();
    garbage.token.sig = "!!".into();
    assert!(matches!(
        a.attest(&garbage, NOW),
        Err(SymmetricKeyAttestationError::Malformed(_))
    ));
}

/// Event Hubs clients sign with the key's text as the HMAC key; [`verify_text_key`] takes
/// those tokens, [`verify`] does not, and the other way round.
#[test]
fn text_keys_verify_service_bus_tokens() {
    let sr = enc("sb://hub.example/zerotouch");
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, GROUP_KEY.as_bytes()),
        string_to_sign(&sr, SE).as_bytes(),
    );
    let sig = enc(&STANDARD.encode(tag.as_ref()));
    let token = SasToken::parse(&format!(
        "SharedAccessSignature sr={sr}&sig={sig}&se={SE}&skn=service"
    ))
    .unwrap();
    assert_eq!(
        verify_text_key(&token, &[DEVICE_KEY, GROUP_KEY], NOW),
        Ok(1)
    );
    assert_eq!(
        verify(&token, &[GROUP_KEY], NOW),
        Err(SasError::SignatureMismatch)
    );
    let iot_hub = SasToken::parse(&sign("hub.example", GROUP_KEY, SE, None).unwrap()).unwrap();
    assert_eq!(
        verify_text_key(&iot_hub, &[GROUP_KEY], NOW),
        Err(SasError::SignatureMismatch)
    );
}
