//! `zerotouch-attestation` answers *who is this device*: it checks the evidence a device
//! presents against what an enrollment says it should present.
//!
//! One module per mechanism:
//! - [`symmetric_key`]: SAS tokens (`SharedAccessSignature sr=…&sig=…&se=…`), group key
//!   derivation, key generation and validation.
//! - [`x509`]: certificate parsing (PEM or base64 DER), the Azure `X509CertificateInfo`
//!   summary, signature checks and CA proof-of-possession.
//! - [`tpm`]: `TPM2B_PUBLIC` parsing for endorsement and storage root keys, TPM names, the
//!   default TPM registration id and the activation blob ([`tpm::build_activation`]).
//!
//! Each module also has an attestor implementing the one trait [`Attestor`]:
//! [`symmetric_key::SymmetricKeyAttestor`], [`x509::X509Attestor`] and [`tpm::TpmAttestor`].
//! An attestor is built per registration attempt from what storage holds for that device (the
//! individual enrollment with its registration id, if any, and the candidate groups) and is
//! handed the evidence the device presented. It answers with an [`AttestedIdentity`] or a typed
//! refusal; each refusal type has a `Disabled` variant, distinct from "not authenticated", so
//! that the service can answer with the DPS status `disabled`.
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

/// The attestation mechanism that produced an [`AttestedIdentity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// A SAS token signed with an enrollment key or a key derived from a group key (§3.1–3.2).
    SymmetricKey,
    /// A client certificate presented in the TLS handshake (§3.3).
    X509,
    /// A SAS token signed with a key imported into the device's TPM (§3.4).
    Tpm,
}

/// Which enrollment the evidence matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EnrollmentRef {
    /// The individual enrollment with this registration id (as the device spelled it).
    Individual(String),
    /// The enrollment group with this group id.
    Group(String),
}

/// What a mechanism concluded about a device: it is `registration_id`, proven with
/// `mechanism` against the enrollment `matched`, which is enabled.
///
/// The optional fields are the evidence details a registration record keeps (DPS
/// `registrationState.x509`); they are `None` where the mechanism has no such thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedIdentity {
    /// The registration id the evidence was checked against.
    pub registration_id: String,
    /// How the device proved it.
    pub mechanism: Mechanism,
    /// The enrollment that matched.
    pub matched: EnrollmentRef,
    /// X.509 only: the device's leaf certificate (`x509.certificateInfo`).
    pub certificate_info: Option<x509::CertificateInfo>,
    /// X.509 group only: the group's certificate the chain was anchored at
    /// (`x509.signingCertificateInfo`).
    pub signing_certificate_info: Option<x509::CertificateInfo>,
    /// When the evidence stops being valid, Unix seconds: the SAS token's `se`, or the leaf
    /// certificate's `notAfter`. `None` if unknown (a `notAfter` before 1970).
    pub expires_at: Option<u64>,
}

/// One attestation mechanism: checks the evidence a device presented against the enrollments
/// the attestor was built from.
///
/// Implementations do no I/O and read no clock: `now_unix` (Unix seconds) is the time to check
/// expiry against. They never panic on device input. An `Ok` means the device is authentic
/// *and* the matching enrollment is enabled; evidence that is authentic for a disabled
/// enrollment is the mechanism's `Disabled` error, anything else that fails is some form of
/// "unauthorized" (see each error type).
pub trait Attestor {
    /// What the device presented (a SAS token, a certificate chain, ...).
    type Evidence;
    /// Why the evidence was refused.
    type Error: std::error::Error;

    /// Checks `evidence` at time `now_unix`.
    fn attest(
        &self,
        evidence: &Self::Evidence,
        now_unix: u64,
    ) -> Result<AttestedIdentity, Self::Error>;
}
