//! `zerotouch-certs` answers *what does a device (or the server) get*: the CA hierarchy that
//! Zerotouch runs, and the certificates it issues from it.
//!
//! The crate owns the CA private keys. It generates a P-256 root and intermediate
//! ([`CaHierarchy::generate`]), rebuilds them from stored PEM after a restart
//! ([`CaHierarchy::from_pem`]) and issues from the intermediate: TLS server certificates
//! ([`CaHierarchy::issue_server_certificate`]) and device client certificates from a CSR
//! ([`CaHierarchy::sign_device_csr`]).
//!
//! What this crate must never do:
//! - No I/O: no files, no network, no database, no environment. Callers pass PEM text in and
//!   store the PEM text that comes out; the only outside input is the system clock and RNG.
//! - Never print a private key: keys travel as [`SecretPem`], whose `Debug` and `Display`
//!   print `[redacted]` and which is not `Serialize`.
//! - Never panic on any input; every failure is a typed [`Error`].
#![forbid(unsafe_code)]

mod device;
mod error;
mod hierarchy;
mod hostname;
mod pem;
mod secret;
mod server;

pub use device::IssuedDeviceCertificate;
pub use error::Error;
pub use hierarchy::{CaHierarchy, IssuedCertificate};
pub use secret::SecretPem;
pub use server::{RENEW_BEFORE_DAYS, server_certificate_covers, server_certificate_covers_at};

/// Checks that `hostname` can be a SAN of a server certificate (a DNS name or an IP literal).
pub fn check_hostname(hostname: &str) -> Result<(), Error> {
    hostname::parse(hostname).map(|_| ())
}
