//! `zerotouch-attestation` answers *who is this device*: it checks the evidence a device
//! presents against what an enrollment says it should present.
//!
//! One module per mechanism:
//! - [`symmetric_key`]: SAS tokens (`SharedAccessSignature sr=…&sig=…&se=…`), group key
//!   derivation, key generation and validation.
//! - [`x509`]: certificate parsing (PEM or base64 DER), the Azure `X509CertificateInfo`
//!   summary, signature checks and CA proof-of-possession.
//! - [`tpm`]: `TPM2B_PUBLIC` parsing for endorsement and storage root keys, TPM names and the
//!   default TPM registration id.
//!
//! What this crate must never do:
//! - No I/O: no files, no network, no database, no clock. Callers pass "now" in explicitly,
//!   which keeps every check deterministic and testable. (Key generation reads the OS RNG.)
//! - Never touch storage or know about enrollments' persistence; the service looks enrollments
//!   up and hands the relevant keys or certificates to these functions.
//! - Never panic on device input: every parser returns a typed error for truncated, oversized
//!   or garbage input.
#![forbid(unsafe_code)]

pub mod symmetric_key;
pub mod tpm;
pub mod x509;
