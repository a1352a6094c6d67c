//! Micro-benchmark of device certificate issuance from a CSR.
//!
//! Run with `cargo bench -p zerotouch-certs` (see docs/performance.md). The CA hierarchy and
//! the CSR (ECDSA P-256, as SDK samples make) are built once, outside the timed closure.

// Setup failures should abort the run with a message, as in a test.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use zerotouch_certs::CaHierarchy;

const DEVICE: &str = "bench-device-0001";

fn issuance(c: &mut Criterion) {
    let ca = CaHierarchy::generate("Zerotouch Bench").expect("CA hierarchy");
    let key = KeyPair::generate().expect("device key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, DEVICE);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).expect("CSR").der().to_vec();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    ca.sign_device_csr(&csr, DEVICE, 30, now).expect("issues");

    c.bench_function("certs/sign_device_csr", |b| {
        b.iter(|| ca.sign_device_csr(black_box(&csr), black_box(DEVICE), 30, now))
    });
}

criterion_group!(benches, issuance);
criterion_main!(benches);
