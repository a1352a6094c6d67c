use super::*;

/// The standard EK policy digest (PolicySecret(TPM_RH_ENDORSEMENT)).
const EK_POLICY: &str = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";
const EK_ATTRIBUTES: u32 = 0x0003_00b2;

/// Builder for RSA `TPMT_PUBLIC` areas, defaulting to the standard RSA-2048 EK template.
#[derive(Clone)]
struct Template {
    key_type: u16,
    name_alg: u16,
    attributes: u32,
    auth_policy: Vec<u8>,
    symmetric: Vec<u8>,
    scheme: Vec<u8>,
    bits: u16,
    exponent: u32,
    modulus: Vec<u8>,
}

impl Template {
    fn ek() -> Template {
        Template {
            key_type: ALG_RSA,
            name_alg: ALG_SHA256,
            attributes: EK_ATTRIBUTES,
            auth_policy: hex::decode(EK_POLICY).unwrap(),
            symmetric: [ALG_AES, 128, ALG_CFB]
                .iter()
                .flat_map(|v| v.to_be_bytes())
                .collect(),
            scheme: ALG_NULL.to_be_bytes().to_vec(),
            bits: 2048,
            exponent: 0,
            modulus: (0..256u32).map(|i| (i * 7 + 0x80) as u8).collect(),
        }
    }

    fn area(&self) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(self.key_type.to_be_bytes());
        a.extend(self.name_alg.to_be_bytes());
        a.extend(self.attributes.to_be_bytes());
        a.extend((self.auth_policy.len() as u16).to_be_bytes());
        a.extend(&self.auth_policy);
        a.extend(&self.symmetric);
        a.extend(&self.scheme);
        a.extend(self.bits.to_be_bytes());
        a.extend(self.exponent.to_be_bytes());
        a.extend((self.modulus.len() as u16).to_be_bytes());
        a.extend(&self.modulus);
        a
    }

    fn tpm2b(&self) -> Vec<u8> {
        with_size(&self.area())
    }

    fn b64(&self) -> String {
        STANDARD.encode(self.tpm2b())
    }
}

fn with_size(area: &[u8]) -> Vec<u8> {
    let mut out = (area.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(area);
    out
}

#[test]
fn parses_the_standard_ek() {
    let bytes = Template::ek().tpm2b();
    assert_eq!(bytes.len(), 316);
    assert_eq!(&bytes[..2], &[0x01, 0x3a]);
    let ek = parse_public(&bytes).unwrap();
    assert_eq!(
        ek.key_type,
        TpmKeyType::Rsa {
            bits: 2048,
            exponent: 65_537
        }
    );
    assert_eq!(ek.exponent(), 65_537);
    assert_eq!(ek.name_alg, ALG_SHA256);
    assert_eq!(ek.attributes, EK_ATTRIBUTES);
    assert_eq!(hex::encode(&ek.auth_policy), EK_POLICY);
    assert_eq!(
        ek.symmetric,
        Some(SymmetricDefinition {
            algorithm: ALG_AES,
            key_bits: 128,
            mode: ALG_CFB
        })
    );
    assert_eq!(ek.scheme, None);
    assert_eq!(ek.modulus, Template::ek().modulus);
    assert_eq!(ek.raw(), bytes.as_slice());
    assert_eq!(ek.public_area(), &bytes[2..]);

    assert_eq!(ek.name.len(), 34);
    assert_eq!(&ek.name[..2], &[0x00, 0x0b]);
    assert_eq!(
        &ek.name[2..],
        digest::digest(&digest::SHA256, &bytes[2..]).as_ref()
    );

    assert_eq!(parse_public_b64(&Template::ek().b64()).unwrap(), ek);
    assert_eq!(
        parse_public_b64(&format!(" {}\n", Template::ek().b64())).unwrap(),
        ek
    );
    assert_eq!(parse_endorsement_key(&Template::ek().b64()).unwrap(), ek);
}

#[test]
fn parses_the_standard_srk() {
    let srk = Template {
        attributes: 0x0003_0472,
        auth_policy: Vec::new(),
        ..Template::ek()
    };
    let key = parse_storage_root_key(&srk.b64()).unwrap();
    assert!(key.auth_policy.is_empty());
    assert_eq!(key.attributes, 0x0003_0472);
}

#[test]
fn name_algorithms() {
    for (alg, len) in [(ALG_SHA1, 22), (ALG_SHA256, 34), (ALG_SHA384, 50)] {
        let t = Template {
            name_alg: alg,
            ..Template::ek()
        };
        let key = parse_public(&t.tpm2b()).unwrap();
        assert_eq!(key.name.len(), len, "{alg:#x}");
        assert_eq!(&key.name[..2], &alg.to_be_bytes());
    }
    let sm3 = Template {
        name_alg: 0x0012,
        ..Template::ek()
    };
    assert_eq!(
        parse_public(&sm3.tpm2b()),
        Err(TpmError::UnsupportedNameAlg(0x0012))
    );
    let sha1 = Template {
        name_alg: ALG_SHA1,
        ..Template::ek()
    };
    assert_eq!(
        parse_endorsement_key(&sha1.b64()),
        Err(TpmError::UnsupportedNameAlg(ALG_SHA1))
    );
}

#[test]
fn truncated_at_every_offset_is_an_error() {
    let bytes = Template::ek().tpm2b();
    for end in 0..bytes.len() {
        let prefix = &bytes[..end];
        let err = parse_public(prefix).unwrap_err();
        if end < 2 {
            assert_eq!(err, TpmError::Truncated { what: "size" });
        } else {
            assert_eq!(
                err,
                TpmError::SizeMismatch {
                    declared: 314,
                    actual: end - 2
                }
            );
        }
        // Same prefix with the size patched to match: the structure itself is cut short.
        if end >= 2 {
            let patched = with_size(&bytes[2..end]);
            assert!(
                matches!(parse_public(&patched), Err(TpmError::Truncated { .. })),
                "offset {end}: {:?}",
                parse_public(&patched)
            );
        }
    }
    assert_eq!(
        parse_public(&with_size(&bytes[2..4])),
        Err(TpmError::Truncated { what: "nameAlg" })
    );
    assert_eq!(
        parse_public(&with_size(&bytes[2..bytes.len() - 1])),
        Err(TpmError::Truncated { what: "unique" })
    );
    assert_eq!(
        parse_public(&[0, 0]),
        Err(TpmError::Truncated { what: "type" })
    );
}

#[test]
fn declared_size_must_match() {
    let mut bytes = Template::ek().tpm2b();
    bytes[..2].copy_from_slice(&315u16.to_be_bytes());
    assert_eq!(
        parse_public(&bytes),
        Err(TpmError::SizeMismatch {
            declared: 315,
            actual: 314
        })
    );
    bytes[..2].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(
        parse_public(&bytes),
        Err(TpmError::SizeMismatch {
            declared: 65_535,
            actual: 314
        })
    );
    bytes[..2].copy_from_slice(&313u16.to_be_bytes());
    assert_eq!(
        parse_public(&bytes),
        Err(TpmError::TrailingBytes { count: 1 })
    );

    let mut trailing = Template::ek().tpm2b();
    trailing.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        parse_public(&trailing),
        Err(TpmError::TrailingBytes { count: 3 })
    );

    // Extra bytes inside the declared area, after the structure.
    let mut area = Template::ek().area();
    area.push(0);
    assert_eq!(
        parse_public(&with_size(&area)),
        Err(TpmError::SizeMismatch {
            declared: 315,
            actual: 314
        })
    );
}

#[test]
fn unsupported_types() {
    for key_type in [ALG_ECC, ALG_KEYEDHASH, 0x0025, 0x0000, 0xffff] {
        let t = Template {
            key_type,
            ..Template::ek()
        };
        assert_eq!(
            parse_public(&t.tpm2b()),
            Err(TpmError::UnsupportedType(key_type))
        );
        assert_eq!(
            parse_endorsement_key(&t.b64()),
            Err(TpmError::UnsupportedType(key_type))
        );
    }
}

#[test]
fn key_sizes() {
    let small = Template {
        bits: 1024,
        modulus: vec![0xc5; 128],
        ..Template::ek()
    };
    let key = parse_public(&small.tpm2b()).unwrap();
    assert_eq!(
        key.key_type,
        TpmKeyType::Rsa {
            bits: 1024,
            exponent: 65_537
        }
    );
    assert_eq!(
        parse_endorsement_key(&small.b64()),
        Err(TpmError::UnsupportedKeySize(1024))
    );
    let big = Template {
        bits: 4096,
        modulus: vec![0xc5; 512],
        ..Template::ek()
    };
    assert_eq!(
        parse_endorsement_key(&big.b64()),
        Err(TpmError::UnsupportedKeySize(4096))
    );
    for bits in [0, 2047, 2049, 8192] {
        let odd = Template {
            bits,
            ..Template::ek()
        };
        assert_eq!(
            parse_public(&odd.tpm2b()),
            Err(TpmError::UnsupportedKeySize(bits))
        );
    }
    let short = Template {
        modulus: vec![0xc5; 255],
        ..Template::ek()
    };
    assert_eq!(
        parse_public(&short.tpm2b()),
        Err(TpmError::ModulusLength {
            expected: 256,
            actual: 255
        })
    );
}

#[test]
fn symmetric_and_scheme_variants() {
    let null_sym = Template {
        symmetric: ALG_NULL.to_be_bytes().to_vec(),
        ..Template::ek()
    };
    let key = parse_public(&null_sym.tpm2b()).unwrap();
    assert_eq!(key.symmetric, None);
    assert_eq!(
        parse_endorsement_key(&null_sym.b64()),
        Err(TpmError::UnsupportedSymmetric(ALG_NULL))
    );

    let aes256: Vec<u8> = [ALG_AES, 256, ALG_CFB]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let t = Template {
        symmetric: aes256,
        ..Template::ek()
    };
    assert!(parse_public(&t.tpm2b()).is_ok());
    assert_eq!(
        parse_endorsement_key(&t.b64()),
        Err(TpmError::UnsupportedSymmetric(ALG_AES))
    );

    let xor = Template {
        symmetric: 0x000Au16.to_be_bytes().to_vec(),
        ..Template::ek()
    };
    assert_eq!(
        parse_public(&xor.tpm2b()),
        Err(TpmError::UnsupportedSymmetric(0x000A))
    );

    let rsassa: Vec<u8> = [ALG_RSASSA, ALG_SHA256]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let t = Template {
        scheme: rsassa,
        ..Template::ek()
    };
    assert_eq!(
        parse_public(&t.tpm2b()).unwrap().scheme,
        Some(SchemeDefinition {
            algorithm: ALG_RSASSA,
            hash_alg: Some(ALG_SHA256)
        })
    );
    // RSAES has no hash: the next field is keyBits.
    let t = Template {
        scheme: ALG_RSAES.to_be_bytes().to_vec(),
        ..Template::ek()
    };
    assert_eq!(
        parse_public(&t.tpm2b()).unwrap().scheme,
        Some(SchemeDefinition {
            algorithm: ALG_RSAES,
            hash_alg: None
        })
    );
    let t = Template {
        scheme: 0x0018u16.to_be_bytes().to_vec(),
        ..Template::ek()
    };
    assert_eq!(
        parse_public(&t.tpm2b()),
        Err(TpmError::UnsupportedScheme(0x0018))
    );
}

#[test]
fn same_key_compares_key_material_only() {
    let ek = parse_public(&Template::ek().tpm2b()).unwrap();
    let other_attrs = Template {
        attributes: 0x0006_0072,
        auth_policy: vec![],
        ..Template::ek()
    };
    assert!(ek.same_key(&parse_public(&other_attrs.tpm2b()).unwrap()));
    let explicit_exponent = Template {
        exponent: 65_537,
        ..Template::ek()
    };
    let explicit = parse_public(&explicit_exponent.tpm2b()).unwrap();
    assert!(ek.same_key(&explicit));
    assert_ne!(ek.raw(), explicit.raw());
    let mut modulus = Template::ek().modulus;
    modulus[100] ^= 1;
    let different = Template {
        modulus,
        ..Template::ek()
    };
    assert!(!ek.same_key(&parse_public(&different.tpm2b()).unwrap()));
    let exponent3 = Template {
        exponent: 3,
        ..Template::ek()
    };
    assert!(!ek.same_key(&parse_public(&exponent3.tpm2b()).unwrap()));
}

#[test]
fn registration_id_is_base32_of_sha256() {
    let ek = parse_public(&Template::ek().tpm2b()).unwrap();
    let id = ek.registration_id();
    assert_eq!(id.len(), 52);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    );
    assert_eq!(
        id,
        base32_lower(digest::digest(&digest::SHA256, ek.raw()).as_ref())
    );
    // The id hashes the bytes as sent, so another encoding of the same key gives another id.
    let explicit = Template {
        exponent: 65_537,
        ..Template::ek()
    };
    assert_ne!(
        parse_public(&explicit.tpm2b()).unwrap().registration_id(),
        id
    );
}

#[test]
fn base32_rfc4648_vectors() {
    for (input, expected) in [
        ("", ""),
        ("f", "my"),
        ("fo", "mzxq"),
        ("foo", "mzxw6"),
        ("foob", "mzxw6yq"),
        ("fooba", "mzxw6ytb"),
        ("foobar", "mzxw6ytboi"),
    ] {
        assert_eq!(base32_lower(input.as_bytes()), expected, "{input}");
    }
    assert_eq!(base32_lower(&[0xff; 5]), "77777777");
    assert_eq!(base32_lower(&[0x00; 5]), "aaaaaaaa");
}

#[test]
fn base64_errors() {
    assert_eq!(parse_public_b64("not base64!"), Err(TpmError::NotBase64));
    assert_eq!(
        parse_public_b64(""),
        Err(TpmError::Truncated { what: "size" })
    );
    assert_eq!(
        parse_endorsement_key("AA=="),
        Err(TpmError::Truncated { what: "size" })
    );
}

#[test]
fn garbage_never_panics() {
    // A small deterministic generator: no test dependency on `rand`.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ek = Template::ek().tpm2b();
    for round in 0..5_000 {
        let len = (next() % 400) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && len >= 2 {
            // Keep the size consistent so the inner parser gets exercised.
            bytes[..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
        }
        let _ = parse_public(&bytes);
        // Mutations of a valid EK.
        let mut mutated = ek.clone();
        let at = (next() as usize) % mutated.len();
        mutated[at] = next() as u8;
        let _ = parse_public(&mutated);
    }
}

// --- TpmAttestor ---

const SCOPE: &str = "0ne00000001";
const SE: u64 = 1_700_000_000;
const NOW: u64 = SE - 600;

fn ek_with(seed: u32) -> TpmPublic {
    let mut t = Template::ek();
    t.modulus = (0..256u32).map(|i| (i * 13 + seed) as u8 | 0x80).collect();
    parse_endorsement_key(&t.b64()).unwrap()
}

fn tpm_attestor(enabled: bool, key: Option<&str>) -> TpmAttestor {
    TpmAttestor {
        id_scope: SCOPE.into(),
        enrollment: Some(TpmEnrollment {
            endorsement_key: ek_with(1),
            enabled,
        }),
        authentication_key: key.map(Into::into),
    }
}

fn tpm_evidence(key: &str, se: u64) -> TpmEvidence {
    let header = symmetric_key::sign(
        &symmetric_key::registration_resource(SCOPE, "tpm-01"),
        key,
        se,
        Some("registration"),
    )
    .unwrap();
    TpmEvidence {
        registration_id: "tpm-01".into(),
        endorsement_key: ek_with(1),
        token: Some(SasToken::parse(&header).unwrap()),
    }
}

#[test]
fn tpm_attestor_accepts_the_issued_key() {
    let key = symmetric_key::generate_key().unwrap();
    let identity = tpm_attestor(true, Some(&key))
        .attest(&tpm_evidence(&key, SE), NOW)
        .unwrap();
    assert_eq!(
        identity,
        AttestedIdentity {
            registration_id: "tpm-01".into(),
            mechanism: Mechanism::Tpm,
            matched: EnrollmentRef::Individual("tpm-01".into()),
            certificate_info: None,
            signing_certificate_info: None,
            expires_at: Some(SE),
        }
    );
}

#[test]
fn tpm_attestor_refusals() {
    let key = symmetric_key::generate_key().unwrap();
    let other = symmetric_key::generate_key().unwrap();
    let good = tpm_evidence(&key, SE);
    let a = tpm_attestor(true, Some(&key));

    let none = TpmAttestor {
        enrollment: None,
        ..a.clone()
    };
    assert_eq!(
        none.attest(&good, NOW),
        Err(TpmAttestationError::NotEnrolled)
    );

    let mut foreign_ek = good.clone();
    foreign_ek.endorsement_key = ek_with(2);
    assert_eq!(
        a.attest(&foreign_ek, NOW),
        Err(TpmAttestationError::EndorsementKeyMismatch)
    );

    let mut first_request = good.clone();
    first_request.token = None;
    assert_eq!(
        a.attest(&first_request, NOW),
        Err(TpmAttestationError::ChallengeRequired)
    );
    assert_eq!(
        tpm_attestor(true, None).attest(&good, NOW),
        Err(TpmAttestationError::ChallengeRequired)
    );

    assert_eq!(
        a.attest(&tpm_evidence(&other, SE), NOW),
        Err(TpmAttestationError::Unauthorized)
    );
    assert_eq!(
        a.attest(&good, SE + symmetric_key::CLOCK_SKEW_SECS),
        Err(TpmAttestationError::Expired)
    );

    let mut wrong_id = good.clone();
    wrong_id.registration_id = "tpm-02".into();
    assert_eq!(
        a.attest(&wrong_id, NOW),
        Err(TpmAttestationError::WrongResource)
    );
    let mut wrong_skn = good.clone();
    if let Some(token) = wrong_skn.token.as_mut() {
        token.skn = Some("owner".into());
    }
    assert_eq!(a.attest(&wrong_skn, NOW), Err(TpmAttestationError::KeyName));

    // Disabled is only revealed to a device holding the issued key.
    let off = tpm_attestor(false, Some(&key));
    assert_eq!(off.attest(&good, NOW), Err(TpmAttestationError::Disabled));
    assert_eq!(
        off.attest(&tpm_evidence(&other, SE), NOW),
        Err(TpmAttestationError::Unauthorized)
    );
}
