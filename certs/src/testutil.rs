//! Test helpers: running the `openssl` command-line tool on what this crate produces, and
//! device keys and CSRs made at test time (no key is ever committed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rcgen::{CertificateParams, DnType, KeyPair};

use crate::{CaHierarchy, IssuedDeviceCertificate};

/// The current time, Unix seconds. Tests use the real clock because
/// [`CaHierarchy::generate`] does: the intermediate is valid from now on.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Runs `openssl` with `args` in `dir`. Panics (fails the test) if the binary is missing: an
/// interop test must never pass silently without the client it is about.
pub fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("the openssl command-line tool is required: {e}"))
}

/// Runs `openssl` and fails the test unless it exits 0; returns stdout and stderr together.
pub fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let out = openssl(dir, args);
    let text = output_text(&out);
    assert!(out.status.success(), "openssl {args:?} failed:\n{text}");
    text
}

/// stdout followed by stderr, lossily decoded.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A fresh P-256 device key and a CSR (DER) with subject `CN={cn}`.
pub fn device_csr(cn: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

/// A hierarchy and one device certificate issued from it now, valid 30 days.
pub fn ca_and_device(cn: &str) -> (CaHierarchy, IssuedDeviceCertificate) {
    let ca = CaHierarchy::generate("test").unwrap();
    let (_, csr) = device_csr(cn);
    let issued = ca.sign_device_csr(&csr, cn, 30, now()).unwrap();
    (ca, issued)
}
