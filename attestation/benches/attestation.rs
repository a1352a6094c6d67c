//! Micro-benchmarks of the attestation hot paths: SAS verification, group key derivation,
//! X.509 chain validation and the TPM activation blob.
//!
//! Run with `cargo bench -p zerotouch-attestation` (see docs/performance.md). Everything a
//! benchmark needs (keys, tokens, certificate chains, TPM public areas) is built once, outside
//! the timed closure.

// Setup failures should abort the run with a message, as in a test.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use openssl::rsa::Rsa;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use zerotouch_attestation::Attestor;
use zerotouch_attestation::symmetric_key::{self, SasToken};
use zerotouch_attestation::tpm::{
    self, ALG_AES, ALG_CFB, ALG_NULL, ALG_RSA, ALG_SHA256, TpmPublic,
};
use zerotouch_attestation::x509::{GroupCertificate, X509Attestor, X509Evidence, X509Group};

/// 2025-01-01T00:00:00Z: inside the validity of every certificate and token built here.
const NOW: u64 = 1_735_689_600;
const ID_SCOPE: &str = "0ne00000001";
const DEVICE: &str = "bench-device-0001";

fn sas(c: &mut Criterion) {
    let key = symmetric_key::generate_key().expect("generate key");
    let resource = symmetric_key::registration_resource(ID_SCOPE, DEVICE);
    let header =
        symmetric_key::sign(&resource, &key, NOW + 3600, Some("registration")).expect("sign token");
    let token = SasToken::parse(&header).expect("parse token");
    let keys = [key.as_str()];

    c.bench_function("sas/verify", |b| {
        b.iter(|| symmetric_key::verify(black_box(&token), black_box(&keys), NOW))
    });
    c.bench_function("sas/parse_and_verify", |b| {
        b.iter(|| {
            let token = SasToken::parse(black_box(&header)).expect("parse token");
            symmetric_key::verify(&token, black_box(&keys), NOW)
        })
    });
    let group_key = symmetric_key::generate_key().expect("generate key");
    c.bench_function("sas/derive_device_key", |b| {
        b.iter(|| symmetric_key::derive_device_key(black_box(&group_key), black_box(DEVICE)))
    });
}

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

/// A group on the root, a device presenting leaf + intermediate (ECDSA P-256 throughout, as
/// rcgen and the service's own CA use).
fn x509_chain(c: &mut Criterion) {
    let root_key = KeyPair::generate().expect("root key");
    let root_params = ca_params("Bench Root", None);
    let root_der = root_params
        .self_signed(&root_key)
        .expect("root cert")
        .der()
        .to_vec();
    let root = Issuer::new(root_params, root_key);

    let intermediate_key = KeyPair::generate().expect("intermediate key");
    let intermediate_params = ca_params("Bench Intermediate", Some(0));
    let intermediate_der = intermediate_params
        .signed_by(&intermediate_key, &root)
        .expect("intermediate cert")
        .der()
        .to_vec();
    let intermediate = Issuer::new(intermediate_params, intermediate_key);

    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf_params = params(DEVICE);
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_der = leaf_params
        .signed_by(&leaf_key, &intermediate)
        .expect("leaf cert")
        .der()
        .to_vec();

    let attestor = X509Attestor {
        individual: None,
        groups: vec![X509Group {
            group_id: "bench-group".into(),
            certificates: vec![GroupCertificate::Signing(root_der.clone())],
            enabled: true,
        }],
        verified_cas: vec![root_der],
    };
    let evidence = X509Evidence {
        registration_id: DEVICE.into(),
        leaf: leaf_der,
        chain: vec![intermediate_der],
    };
    attestor.attest(&evidence, NOW).expect("the chain attests");

    c.bench_function("x509/attest_group_chain", |b| {
        b.iter(|| attestor.attest(black_box(&evidence), NOW))
    });
}

/// An RSA-2048 `TPM2B_PUBLIC` in the EK template (nameAlg SHA-256, AES-128-CFB, exponent 0)
/// or, with `auth_policy` empty and the SRK attributes, the SRK template.
fn tpm2b_public(modulus: &[u8], attributes: u32, auth_policy: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend(ALG_RSA.to_be_bytes());
    a.extend(ALG_SHA256.to_be_bytes());
    a.extend(attributes.to_be_bytes());
    a.extend(
        u16::try_from(auth_policy.len())
            .expect("policy size")
            .to_be_bytes(),
    );
    a.extend(auth_policy);
    a.extend(ALG_AES.to_be_bytes());
    a.extend(128u16.to_be_bytes());
    a.extend(ALG_CFB.to_be_bytes());
    a.extend(ALG_NULL.to_be_bytes());
    a.extend(2048u16.to_be_bytes());
    a.extend(0u32.to_be_bytes());
    a.extend(
        u16::try_from(modulus.len())
            .expect("modulus size")
            .to_be_bytes(),
    );
    a.extend(modulus);
    let mut out = u16::try_from(a.len())
        .expect("area size")
        .to_be_bytes()
        .to_vec();
    out.extend(a);
    out
}

fn tpm_activation(c: &mut Criterion) {
    const EK_ATTRIBUTES: u32 = 0x0003_00b2;
    const SRK_ATTRIBUTES: u32 = 0x0003_0472;
    // The standard EK policy (PolicySecret(TPM_RH_ENDORSEMENT)).
    let ek_policy = hex::decode("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
        .expect("policy hex");
    let public = |attributes: u32, policy: &[u8]| -> TpmPublic {
        let rsa = Rsa::generate(2048).expect("rsa key");
        let modulus = rsa.n().to_vec_padded(256).expect("modulus");
        tpm::parse_public(&tpm2b_public(&modulus, attributes, policy)).expect("TPM2B_PUBLIC")
    };
    let ek = public(EK_ATTRIBUTES, &ek_policy);
    let srk = public(SRK_ATTRIBUTES, &[]);
    tpm::build_activation(&ek, &srk).expect("activation");

    c.bench_function("tpm/build_activation", |b| {
        b.iter(|| tpm::build_activation(black_box(&ek), black_box(&srk)))
    });
}

criterion_group!(benches, sas, x509_chain, tpm_activation);
criterion_main!(benches);
