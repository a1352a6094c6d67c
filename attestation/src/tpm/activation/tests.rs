use std::sync::OnceLock;

use openssl::pkey::Private;
use openssl::sign::Signer;

use super::*;
use crate::tpm::{ALG_NULL, ALG_RSA, ALG_SHA1, parse_public};

const EK_POLICY: &str = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";
const EK_ATTRIBUTES: u32 = 0x0003_00b2;
const SRK_ATTRIBUTES: u32 = 0x0003_0472;

/// An RSA `TPM2B_PUBLIC` like the ones a TPM reports, parameterised where tests need it.
struct Area {
    name_alg: u16,
    attributes: u32,
    auth_policy: Vec<u8>,
    /// `(algorithm, keyBits, mode)`, or `None` for TPM_ALG_NULL.
    symmetric: Option<(u16, u16, u16)>,
    bits: u16,
    exponent: u32,
    modulus: Vec<u8>,
}

impl Area {
    fn ek(modulus: &[u8]) -> Area {
        Area {
            name_alg: ALG_SHA256,
            attributes: EK_ATTRIBUTES,
            auth_policy: hex::decode(EK_POLICY).unwrap(),
            symmetric: Some((ALG_AES, 128, ALG_CFB)),
            bits: 2048,
            exponent: 0,
            modulus: modulus.to_vec(),
        }
    }

    fn srk(modulus: &[u8]) -> Area {
        Area {
            attributes: SRK_ATTRIBUTES,
            auth_policy: Vec::new(),
            ..Area::ek(modulus)
        }
    }

    fn tpm2b(&self) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(ALG_RSA.to_be_bytes());
        a.extend(self.name_alg.to_be_bytes());
        a.extend(self.attributes.to_be_bytes());
        a.extend((self.auth_policy.len() as u16).to_be_bytes());
        a.extend(&self.auth_policy);
        match self.symmetric {
            Some((alg, bits, mode)) => {
                a.extend(alg.to_be_bytes());
                a.extend(bits.to_be_bytes());
                a.extend(mode.to_be_bytes());
            }
            None => a.extend(ALG_NULL.to_be_bytes()),
        }
        a.extend(ALG_NULL.to_be_bytes());
        a.extend(self.bits.to_be_bytes());
        a.extend(self.exponent.to_be_bytes());
        a.extend((self.modulus.len() as u16).to_be_bytes());
        a.extend(&self.modulus);
        let mut out = (a.len() as u16).to_be_bytes().to_vec();
        out.extend(a);
        out
    }

    fn parse(&self) -> TpmPublic {
        parse_public(&self.tpm2b()).unwrap()
    }
}

/// A real RSA-2048 key pair and its TPM public area in the EK or SRK template.
struct Device {
    ek: TpmPublic,
    ek_private: Rsa<Private>,
    srk: TpmPublic,
    srk_private: Rsa<Private>,
}

fn device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let ek_private = Rsa::generate(2048).unwrap();
        let srk_private = Rsa::generate(2048).unwrap();
        Device {
            ek: Area::ek(&ek_private.n().to_vec()).parse(),
            srk: Area::srk(&srk_private.n().to_vec()).parse(),
            ek_private,
            srk_private,
        }
    })
}

/// A synthetic 2048-bit modulus (odd, top bit set): enough for RSA public operations and
/// stable across runs, so that names and the deterministic fields can be pinned.
fn synthetic_modulus(salt: u32) -> Vec<u8> {
    let mut m: Vec<u8> = (0..256u32).map(|i| (i * 7 + salt) as u8).collect();
    m[0] |= 0x80;
    m[255] |= 1;
    m
}

fn fixed_randomness() -> ActivationRandomness {
    fn fill<const N: usize>(start: u8) -> [u8; N] {
        std::array::from_fn(|i| start.wrapping_add(i as u8))
    }
    ActivationRandomness {
        hmac_key: fill(0x10),
        inner: fill(0x40),
        seed: fill(0x60),
        obf: fill(0x90),
        seed2: fill(0xc0),
    }
}

/// Splits a blob into its six `T2B` fields (size prefixes included), checking nothing is left.
fn fields(blob: &[u8]) -> Vec<&[u8]> {
    let mut rest = blob;
    let mut out = Vec::new();
    for _ in 0..6 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let (field, tail) = rest.split_at(2 + len);
        out.push(field);
        rest = tail;
    }
    assert!(rest.is_empty(), "{} bytes after field 6", rest.len());
    out
}

/// The body of a `T2B`, checking its size prefix.
fn body(t2b: &[u8]) -> &[u8] {
    let len = usize::from(u16::from_be_bytes([t2b[0], t2b[1]]));
    assert_eq!(t2b.len(), 2 + len);
    &t2b[2..]
}

/// HMAC-SHA256 through openssl (`PKey::hmac` + `Signer`), independent of the ring code path.
fn openssl_hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = PKey::hmac(key).unwrap();
    let mut signer = Signer::new(MessageDigest::sha256(), &key).unwrap();
    signer.update(data).unwrap();
    signer.sign_to_vec().unwrap()
}

fn openssl_sha256(data: &[u8]) -> Vec<u8> {
    openssl::hash::hash(MessageDigest::sha256(), data)
        .unwrap()
        .to_vec()
}

fn cfb_decrypt(key: &[u8], data: &[u8]) -> Vec<u8> {
    symm::decrypt(Cipher::aes_128_cfb128(), key, Some(&[0u8; 16]), data).unwrap()
}

fn oaep_decrypt(key: &Rsa<Private>, data: &[u8], label: &[u8]) -> Result<Vec<u8>, ErrorStack> {
    let pkey = PKey::from_rsa(key.clone())?;
    let mut d = openssl::encrypt::Decrypter::new(&pkey)?;
    d.set_rsa_padding(Padding::PKCS1_OAEP)?;
    d.set_rsa_oaep_md(MessageDigest::sha256())?;
    d.set_rsa_mgf1_md(MessageDigest::sha256())?;
    d.set_rsa_oaep_label(label)?;
    let mut out = vec![0; d.decrypt_len(data)?];
    let n = d.decrypt(data, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// SP800-108 counter-mode KDF written out from the TPM spec text, on openssl's HMAC.
fn reference_kdfa(key: &[u8], label: &str, u: &[u8], v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut stream = Vec::new();
    let mut i = 0u32;
    while stream.len() < bytes {
        i += 1;
        let mut input = Vec::new();
        input.extend(i.to_be_bytes());
        input.extend(label.as_bytes());
        input.push(0);
        input.extend(u);
        input.extend(v);
        input.extend(bits.to_be_bytes());
        stream.extend(openssl_hmac(key, &input));
    }
    stream.truncate(bytes);
    if !bits.is_multiple_of(8) {
        stream[0] &= (1u8 << (bits % 8)) - 1;
    }
    stream
}

#[test]
fn kdfa_matches_an_independent_computation() {
    let key: Vec<u8> = (0u8..32).collect();
    let name = hex::decode(format!("000b{}", "ab".repeat(32))).unwrap();
    for (label, u, v, bits) in [
        ("STORAGE", name.as_slice(), &[][..], 128u16),
        ("INTEGRITY", &[][..], &[][..], 256),
        ("STORAGE", &[][..], &[][..], 128),
        (
            "LONGER",
            b"context-u".as_slice(),
            b"context-v".as_slice(),
            600,
        ),
        ("ODD", name.as_slice(), &[][..], 12),
        ("ZERO", &[][..], &[][..], 0),
    ] {
        let ours = kdfa(&key, label.as_bytes(), u, v, bits);
        assert_eq!(
            ours,
            reference_kdfa(&key, label, u, v, u32::from(bits)),
            "{label} {bits}"
        );
        assert_eq!(ours.len(), usize::from(bits.div_ceil(8)));
    }
    // First block, spelled out: HMAC(key, 00000001 ‖ "INTEGRITY" ‖ 00 ‖ 00000100).
    let block = openssl_hmac(
        &key,
        &hex::decode("00000001494e544547524954590000000100").unwrap(),
    );
    assert_eq!(kdfa(&key, b"INTEGRITY", &[], &[], 256), block);
    // The 12-bit output keeps only the low 4 bits of its first byte.
    assert_eq!(kdfa(&key, b"ODD", &name, &[], 12)[0] & 0xf0, 0);
}

#[test]
fn field_sizes_for_rsa_2048() {
    let d = device();
    let activation = build_activation(&d.ek, &d.srk).unwrap();
    let f = fields(&activation.blob);
    let sizes: Vec<usize> = f.iter().map(|x| x.len()).collect();
    assert_eq!(sizes, [54, 258, 144, 258, 50, 2]);
    assert_eq!(activation.blob.len(), 766);
    // Field 1: T2B(T2B(integrity) ‖ encIdentity[18]).
    assert_eq!(&f[0][..4], &[0, 52, 0, 32]);
    // Field 3: T2B(T2B(outer) ‖ dup[108]).
    assert_eq!(&f[2][..4], &[0, 142, 0, 32]);
    assert_eq!(&f[1][..2], &[1, 0]);
    assert_eq!(&f[3][..2], &[1, 0]);
    assert_eq!(&f[4][..2], &[0, 48]);
    assert_eq!(f[5], &[0, 0]);

    use base64::Engine as _;
    let decoded = STANDARD.decode(activation.blob_base64()).unwrap();
    assert_eq!(decoded, activation.blob);
    assert_eq!(
        STANDARD.decode(activation.hmac_key_base64()).unwrap(),
        activation.hmac_key
    );
    assert!(!format!("{activation:?}").contains(&hex::encode(activation.hmac_key)));
}

#[test]
fn hmac_key_public_area_bytes_and_name() {
    let r = fixed_randomness();
    let area = hmac_key_public_area(&r.obf, &r.hmac_key).unwrap();
    let unique = openssl_sha256(&[r.obf, r.hmac_key].concat());
    // type, nameAlg, objectAttributes, authPolicy (empty), scheme HMAC + SHA-256, unique.
    let expected = hex::decode(format!(
        "0008000b0004044000000005000b0020{}",
        hex::encode(&unique)
    ))
    .unwrap();
    assert_eq!(area, expected);
    assert_eq!(area.len(), 48);
    let expected_name = [&[0x00, 0x0b][..], &openssl_sha256(&area)].concat();
    assert_eq!(name(&area), expected_name);

    let activation = build_activation_with(&device().ek, &device().srk, &r).unwrap();
    let f = fields(&activation.blob);
    assert_eq!(body(f[4]), area.as_slice());
}

#[test]
fn deterministic_fields_are_stable_under_fixed_randomness() {
    let ek = Area::ek(&synthetic_modulus(0x11)).parse();
    let srk = Area::srk(&synthetic_modulus(0x22)).parse();
    let r = fixed_randomness();
    let a = build_activation_with(&ek, &srk, &r).unwrap();
    let b = build_activation_with(&ek, &srk, &r).unwrap();
    let (fa, fb) = (fields(&a.blob), fields(&b.blob));
    for i in [0, 2, 4, 5] {
        assert_eq!(fa[i], fb[i], "field {}", i + 1);
    }
    // RSA-OAEP padding is randomised.
    assert_ne!(fa[1], fb[1]);
    assert_ne!(fa[3], fb[3]);
    assert_eq!(a.hmac_key, r.hmac_key);

    // Pinned: a change here changes what the TPM receives (re-run the swtpm test:
    // `cargo test -p zerotouch-tests --test tpm_activation`).
    assert_eq!(
        hex::encode(openssl_sha256(fa[0])),
        "8b55ed65208e1cee319139b961aa0a7847ae99f55c0578de9af2ce6a4a1f8658",
    );
    assert_eq!(
        hex::encode(openssl_sha256(fa[2])),
        "b496e67d2bb65c9a81516a8500ce9aa56edc9d53f1f6787819a3de46324def2d",
    );

    // Other randomness, other fields.
    let other = ActivationRandomness {
        seed: [0xee; 32],
        seed2: [0xdd; 32],
        ..fixed_randomness()
    };
    let c = build_activation_with(&ek, &srk, &other).unwrap();
    let fc = fields(&c.blob);
    assert_ne!(fa[0], fc[0]);
    assert_ne!(fa[2], fc[2]);
    assert_eq!(fa[4], fc[4]);
}

/// Plays the TPM in software: ActivateCredential with the EK private key, then Import under
/// the SRK private key, checking every integrity value on the way.
#[test]
fn a_software_tpm_recovers_the_hmac_key() {
    let d = device();
    let r = fixed_randomness();
    let activation = build_activation_with(&d.ek, &d.srk, &r).unwrap();
    let f = fields(&activation.blob);

    // ActivateCredential.
    let seed = oaep_decrypt(&d.ek_private, body(f[1]), b"IDENTITY\0").unwrap();
    assert_eq!(seed, r.seed);
    assert!(oaep_decrypt(&d.ek_private, body(f[1]), b"DUPLICATE\0").is_err());
    let id_object = body(f[0]);
    let (integrity, enc_identity) = (body(&id_object[..34]), &id_object[34..]);
    assert_eq!(enc_identity.len(), 18);
    let hmac_key = reference_kdfa(&seed, "INTEGRITY", &[], &[], 256);
    assert_eq!(
        integrity,
        openssl_hmac(&hmac_key, &[enc_identity, &d.srk.name].concat())
    );
    let sym = reference_kdfa(&seed, "STORAGE", &d.srk.name, &[], 128);
    let credential = cfb_decrypt(&sym, enc_identity);
    assert_eq!(body(&credential), r.inner);

    // Import, outer wrapper.
    let seed2 = oaep_decrypt(&d.srk_private, body(f[3]), b"DUPLICATE\0").unwrap();
    assert_eq!(seed2, r.seed2);
    let public_area = body(f[4]);
    let object_name = [&[0x00, 0x0b][..], &openssl_sha256(public_area)].concat();
    let private = body(f[2]);
    let (outer, dup) = (body(&private[..34]), &private[34..]);
    assert_eq!(dup.len(), 108);
    let outer_key = reference_kdfa(&seed2, "INTEGRITY", &[], &[], 256);
    assert_eq!(
        outer,
        openssl_hmac(&outer_key, &[dup, &object_name].concat())
    );
    let outer_sym = reference_kdfa(&seed2, "STORAGE", &object_name, &[], 128);
    let enc_sensitive = cfb_decrypt(&outer_sym, dup);

    // Inner wrapper, with the credential.
    let plain = cfb_decrypt(body(&credential), &enc_sensitive);
    let (inner_integrity, sensitive) = (body(&plain[..34]), &plain[34..]);
    assert_eq!(sensitive.len(), 74);
    assert_eq!(
        inner_integrity,
        openssl_sha256(&[sensitive, &object_name].concat())
    );
    // TPMT_SENSITIVE: KEYEDHASH, empty auth, obfuscation, key.
    let s = body(sensitive);
    assert_eq!(&s[..4], &[0x00, 0x08, 0x00, 0x00]);
    assert_eq!(body(&s[4..38]), r.obf);
    assert_eq!(body(&s[38..72]), r.hmac_key);
    // unique binds the public area to the sensitive part.
    assert_eq!(
        &public_area[16..],
        openssl_sha256(&[r.obf, r.hmac_key].concat())
    );
}

#[test]
fn fresh_randomness_differs() {
    let d = device();
    let a = build_activation(&d.ek, &d.srk).unwrap();
    let b = build_activation(&d.ek, &d.srk).unwrap();
    assert_ne!(a.hmac_key, b.hmac_key);
    assert_ne!(a.blob, b.blob);
    assert_eq!(fields(&a.blob)[4].len(), 50);
}

#[test]
fn unsupported_keys_are_typed_errors() {
    let ek_mod = synthetic_modulus(0x11);
    let srk = Area::srk(&synthetic_modulus(0x22)).parse();
    let ek = Area::ek(&ek_mod).parse();
    let r = fixed_randomness();
    let err = |ek: &TpmPublic, srk: &TpmPublic| build_activation_with(ek, srk, &r).unwrap_err();

    let rsa1024 = Area {
        bits: 1024,
        ..Area::ek(&synthetic_modulus(0x11)[..128])
    }
    .parse();
    assert_eq!(
        err(&rsa1024, &srk),
        ActivationError::UnsupportedKey("endorsement key is not RSA-2048")
    );
    assert_eq!(
        err(&ek, &rsa1024),
        ActivationError::UnsupportedKey("storage root key is not RSA-2048")
    );

    // A 2048-bit key whose modulus does not fill 256 bytes, or is not 256 bytes long.
    let mut short_top = ek_mod.clone();
    short_top[0] = 0x7f;
    let short_top = Area::ek(&short_top).parse();
    assert_eq!(
        err(&short_top, &srk),
        ActivationError::UnsupportedKey("endorsement key is not RSA-2048")
    );
    let mut truncated = ek.clone();
    truncated.modulus.truncate(200);
    assert_eq!(
        err(&truncated, &srk),
        ActivationError::UnsupportedKey("endorsement key is not RSA-2048")
    );

    let sha1 = Area {
        name_alg: ALG_SHA1,
        ..Area::srk(&synthetic_modulus(0x22))
    }
    .parse();
    assert_eq!(
        err(&ek, &sha1),
        ActivationError::UnsupportedKey("storage root key nameAlg is not SHA-256")
    );

    for symmetric in [
        None,
        Some((ALG_AES, 256, ALG_CFB)),
        Some((0x0026, 128, ALG_CFB)),
    ] {
        let key = Area {
            symmetric,
            ..Area::ek(&ek_mod)
        }
        .parse();
        assert_eq!(
            err(&key, &srk),
            ActivationError::UnsupportedKey(
                "endorsement key symmetric algorithm is not AES-128-CFB"
            ),
            "{symmetric:?}"
        );
    }

    // openssl refuses an even modulus: a Crypto error, not a panic.
    let mut even = ek_mod.clone();
    even[255] &= 0xfe;
    let even = Area::ek(&even).parse();
    assert!(matches!(err(&even, &srk), ActivationError::Crypto(_)));
    assert!(
        err(&even, &srk)
            .to_string()
            .starts_with("activation blob cryptography failed")
    );
}

#[test]
fn odd_public_keys_never_panic() {
    let srk = Area::srk(&synthetic_modulus(0x22)).parse();
    let r = fixed_randomness();
    for exponent in [0, 1, 2, 3, 17, 65_537, 0x8000_0000, u32::MAX] {
        for modulus in [
            synthetic_modulus(0x33),
            vec![0xff; 256],
            [vec![0x80], vec![0; 254], vec![1]].concat(),
        ] {
            let ek = Area {
                exponent,
                ..Area::ek(&modulus)
            }
            .parse();
            if let Ok(a) = build_activation_with(&ek, &srk, &r) {
                assert_eq!(a.blob.len(), 766);
            }
        }
    }
}
