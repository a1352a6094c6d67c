//! `zerotouch-certs` answers *what does a device (or the server) get*: the CA hierarchy that
//! Zerotouch runs, and the certificates it issues from it.
//!
//! The crate owns the CA private keys. It generates a P-256 root and intermediate
//! ([`CaHierarchy::generate`]), rebuilds them from stored PEM after a restart
//! ([`CaHierarchy::from_pem`]) and issues from the intermediate: TLS server certificates
//! ([`CaHierarchy::issue_server_certificate`]) and device client certificates from a CSR
//! ([`CaHierarchy::sign_device_csr`], or [`CaHierarchy::sign_device_csr_with`] and an
//! [`IssuanceProfile`] that adds CRL distribution point and OCSP / CA-issuers URLs).
//!
//! Around issuance, the PKI lifecycle primitives, one module each:
//! - [`revocation`]: X.509 v2 CRLs signed by the intermediate ([`CaHierarchy::sign_crl`]) and
//!   the RFC 5280 [`revocation::ReasonCode`]s.
//! - [`ocsp`]: the core of an RFC 6960 responder: parse a request, tell whether a CertID is
//!   ours, build the signed (or error) response. The caller looks statuses up.
//! - [`est`]: RFC 7030 body encodings: certs-only PKCS#7, CSR bodies, `/csrattrs`.
//! - [`renewal`]: when a certificate may be renewed, and whether a CSR keeps its key and
//!   subject.
//! - [`sealed`]: CA private keys encrypted at rest under a key-encryption key (AES-256-GCM).
//! - [`pkcs11`]: the intermediate key inside a PKCS#11 token (HSM, SoftHSM2), signing through
//!   `C_Sign` ([`CaHierarchy::from_pem_with_token_key`]).
//!
//! These are pure: the caller passes "now", the revoked serials and the request bytes in, and
//! gets bytes back; only key generation reads the random number generator.
//!
//! What this crate must never do:
//! - No I/O: no files, no network, no database, no environment. The one exception is
//!   [`pkcs11`], which loads the operator's PKCS#11 library and talks to a token through it.
//!   Callers pass PEM text in and
//!   store the PEM text that comes out; the only outside input is the system clock (in
//!   [`CaHierarchy::generate`] and [`CaHierarchy::issue_server_certificate`]) and the RNG.
//! - Never print a private key: keys travel as [`SecretPem`], whose `Debug` and `Display`
//!   print `[redacted]` and which is not `Serialize`.
//! - Never panic on any input; every failure is a typed [`Error`].
#![forbid(unsafe_code)]

mod der;
mod device;
mod error;
pub mod est;
mod hierarchy;
mod hostname;
pub mod ocsp;
mod pem;
pub mod pkcs11;
pub mod renewal;
pub mod revocation;
pub mod sealed;
mod secret;
mod server;
#[cfg(test)]
mod testutil;

pub use device::{IssuanceProfile, IssuedDeviceCertificate};
pub use error::Error;
pub use hierarchy::{CaHierarchy, IssuedCertificate};
pub use secret::SecretPem;
pub use server::{RENEW_BEFORE_DAYS, server_certificate_covers, server_certificate_covers_at};

/// Checks that `hostname` can be a SAN of a server certificate (a DNS name or an IP literal).
pub fn check_hostname(hostname: &str) -> Result<(), Error> {
    hostname::parse(hostname).map(|_| ())
}
