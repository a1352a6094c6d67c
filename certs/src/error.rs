//! The one error type of this crate.

/// Everything that can go wrong while building a CA hierarchy or issuing from it.
///
/// Messages never contain key material; `reason` fields carry parser or library messages only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CA name cannot go into a certificate subject (empty or contains control characters).
    #[error("invalid CA name {0:?}: must be non-empty and free of control characters")]
    InvalidName(String),
    /// A server certificate was requested for no hostnames at all.
    #[error("at least one hostname is required")]
    NoHostnames,
    /// A hostname is neither an IP literal nor a valid DNS name.
    #[error("invalid hostname {0:?}")]
    InvalidHostname(String),
    /// The requested validity is zero days.
    #[error("validity must be at least one day")]
    InvalidValidity,
    /// The requested certificate would outlive the intermediate CA that signs it.
    #[error("a certificate valid for {days} days would outlive the intermediate CA")]
    ValidityBeyondIssuer {
        /// The requested validity in days.
        days: u32,
    },
    /// Key or certificate generation failed (RNG, signing); the text comes from rcgen or ring.
    #[error("certificate generation failed: {0}")]
    Generation(String),
    /// A PEM input could not be parsed as what it should be.
    #[error("invalid {what}: {reason}")]
    InvalidPem {
        /// Which input: "root certificate", "intermediate key", ...
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A certificate that must be a CA lacks `basicConstraints CA:TRUE`.
    #[error("the {what} is not a CA certificate")]
    NotACa {
        /// Which certificate.
        what: &'static str,
    },
    /// A private key does not belong to the certificate it was stored with.
    #[error("the {what} private key does not match its certificate")]
    KeyMismatch {
        /// "root" or "intermediate".
        what: &'static str,
    },
    /// The intermediate certificate was not issued by (signed with the key of) the root.
    #[error("the intermediate certificate is not signed by the root certificate")]
    NotSignedByRoot,
    /// The operation signs with the root key, and this hierarchy does not hold it (an
    /// offline root).
    #[error("the root private key is not available")]
    RootKeyMissing,
    /// The CSR is not a DER PKCS#10 request this crate accepts (unparseable, trailing data,
    /// SHA-1 signature, unsupported key type).
    #[error("invalid CSR: {reason}")]
    InvalidCsr {
        /// Why it was rejected (parser message or a fixed text; never key material).
        reason: String,
    },
    /// The CSR's signature does not verify with its own public key.
    #[error("the CSR signature does not verify")]
    CsrSignatureInvalid,
    /// The CSR's subject CN is missing, ambiguous or not the expected one.
    #[error("the CSR's common name {found:?} is not {expected:?}")]
    CnMismatch {
        /// The CN the certificate must have (the registration id).
        expected: String,
        /// The CSR's single CN, if it has exactly one text CN.
        found: Option<String>,
    },
    /// The given time (Unix seconds) is out of the representable range.
    #[error("time {0} is out of range")]
    InvalidTime(i64),
    /// A certificate serial number is empty, too long or not hex.
    #[error("invalid serial number {0:?}")]
    InvalidSerial(String),
    /// A CRL cannot be built from the given parameters.
    #[error("cannot build the CRL: {reason}")]
    InvalidCrl {
        /// Why (a fixed text or rcgen's message).
        reason: String,
    },
    /// The issuing key's algorithm cannot sign OCSP responses here (this crate signs with
    /// ECDSA P-256/P-384, RSA PKCS#1 v1.5 SHA-256/384/512 and Ed25519 keys).
    #[error("the issuing key's algorithm is not supported for OCSP signing")]
    UnsupportedSigningKey,
    /// The PKCS#11 token holding the intermediate key failed or refused (library not found,
    /// no token with that label, wrong PIN, no such key, a signing error). The text names the
    /// operation and the library's return value; never the PIN.
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
    /// A certificate (DER) could not be parsed.
    #[error("invalid certificate: {reason}")]
    InvalidCertificate {
        /// The parser's message.
        reason: String,
    },
}
