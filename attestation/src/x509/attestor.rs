//! X.509 attestation (§3.3): which enrollment does a presented client certificate chain
//! belong to, and does the chain hold up?
//!
//! Order of decisions:
//! 1. The leaf's subject CN must be the registration id.
//! 2. If an individual enrollment exists for the registration id, it decides alone: the leaf
//!    must be one of its client certificates (DER or thumbprint) and be valid now. No chain is
//!    needed, so self-signed device certificates work.
//! 3. Otherwise walk up from the leaf by name: at each step, the group certificates whose
//!    subject is the current certificate's issuer are the candidates; the current certificate's
//!    issuer among the presented chain is the next step. The closest level whose candidates
//!    validate wins, so a group on an intermediate beats a group on the root.
//! 4. The path from the leaf to a candidate is validated with rustls-webpki (signatures,
//!    validity at `now`, basic constraints and path length, name constraints, EKU client-auth
//!    "required if present"), with the candidate as trust anchor and the presented chain as
//!    intermediates. The candidate must be a CA and valid now (webpki does not look at a trust
//!    anchor's constraints or dates). Each signature is verified once, here: the walk compares
//!    names only, and a candidate whose key did not sign the path fails validation, so a
//!    certificate that merely copies a CA's name gets nowhere.
//! 5. The matched certificate must be trusted: a CA reference must be verified; a signing
//!    certificate stored in the group must itself be a verified CA or roll up to one through
//!    the presented chain ("the root or intermediate certificate configured in an enrollment
//!    group must either be a verified certificate or must roll up to a verified certificate in
//!    the certificate chain a device presents").
//! 6. Only then: a disabled group refuses with [`X509AttestationError::Disabled`], even if a
//!    group further up would accept.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{ALL_VERIFICATION_ALGS, EndEntityCert, KeyUsage, anchor_from_trusted_cert};

use super::{Certificate, X509Error};
use crate::{AttestedIdentity, Attestor, EnrollmentRef, Mechanism};

/// At most this many certificates may follow the leaf in the presented chain.
pub const MAX_CHAIN_LEN: usize = 8;

/// A certificate an individual enrollment lists (`clientCertificates.primary|secondary`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCertificate {
    /// The certificate itself (DER): the leaf must be byte-for-byte this certificate.
    Der(Vec<u8>),
    /// Only a thumbprint: SHA-1 (40 hex digits) or SHA-256 (64 hex digits) of the leaf's DER.
    /// Case and `:` or space separators are ignored.
    Thumbprint(String),
}

/// The X.509 individual enrollment whose registration id the device claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Enrollment {
    /// `clientCertificates.primary`.
    pub primary: Option<ClientCertificate>,
    /// `clientCertificates.secondary`.
    pub secondary: Option<ClientCertificate>,
    /// `provisioningStatus == "enabled"`.
    pub enabled: bool,
}

/// A certificate an enrollment group trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupCertificate {
    /// `signingCertificates.primary|secondary.certificate` (DER), stored in the group. It must
    /// be one of [`X509Attestor::verified_cas`] or roll up to one through the presented chain.
    Signing(Vec<u8>),
    /// `caReferences.primary|secondary`, resolved to the instance CA certificate of that name.
    CaReference {
        /// The CA certificate's name in the instance.
        name: String,
        /// Its certificate (DER).
        certificate: Vec<u8>,
        /// Whether proof of possession was done (or it was verified on upload). An unverified
        /// CA is never trusted.
        verified: bool,
    },
}

impl GroupCertificate {
    fn der(&self) -> &[u8] {
        match self {
            GroupCertificate::Signing(der) => der,
            GroupCertificate::CaReference { certificate, .. } => certificate,
        }
    }
}

/// An X.509 enrollment group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Group {
    /// `enrollmentGroupId`.
    pub group_id: String,
    /// Primary and secondary certificates (signing certificates or CA references).
    pub certificates: Vec<GroupCertificate>,
    /// `provisioningStatus == "enabled"`.
    pub enabled: bool,
}

/// What a device presents for X.509 attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Evidence {
    /// The registration id from the URL (HTTPS) or the MQTT username.
    pub registration_id: String,
    /// The leaf certificate from the TLS handshake (DER).
    pub leaf: Vec<u8>,
    /// The other certificates the device sent after the leaf (DER), in any order.
    pub chain: Vec<Vec<u8>>,
}

/// X.509 attestation over the candidate enrollments of one registration.
///
/// Build it from what storage holds: the individual X.509 enrollment with the claimed
/// registration id, if any; every X.509 enrollment group, enabled or not (with CA references
/// resolved); and the DER of every *verified* CA certificate of the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Attestor {
    /// The individual enrollment for the claimed registration id, if any. When present it
    /// decides alone: groups are not tried.
    pub individual: Option<X509Enrollment>,
    /// The X.509 enrollment groups.
    pub groups: Vec<X509Group>,
    /// The instance's verified CA certificates (DER), for the roll-up rule of signing
    /// certificates.
    pub verified_cas: Vec<Vec<u8>>,
}

/// Why X.509 attestation refused a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509AttestationError {
    /// The leaf or a chain certificate is not a parseable X.509 certificate.
    #[error("presented certificate: {0}")]
    BadCertificate(X509Error),
    /// More than [`MAX_CHAIN_LEN`] certificates follow the leaf.
    #[error("the presented chain is longer than {MAX_CHAIN_LEN} certificates")]
    ChainTooLong,
    /// The leaf's subject CN is missing, ambiguous or not the registration id.
    #[error("the certificate's common name is not the registration id")]
    CnMismatch,
    /// An individual enrollment exists, and the leaf is none of its certificates.
    #[error("the certificate is not the one enrolled for this registration id")]
    CertificateMismatch,
    /// The enrolled leaf's validity ended before now.
    #[error("the certificate has expired")]
    Expired,
    /// The enrolled leaf's validity starts after now.
    #[error("the certificate is not valid yet")]
    NotYetValid,
    /// No enrollment group certificate issued the leaf or any certificate above it in the
    /// presented chain.
    #[error("no enrollment group trusts the certificate's issuer")]
    UnknownIssuer,
    /// The path from the leaf to the matched group certificate does not validate.
    #[error("certificate chain: {0}")]
    Chain(ChainError),
    /// The matched group certificate is a CA reference that is not verified, or a signing
    /// certificate that neither is nor rolls up to a verified CA.
    #[error("the enrollment group's certificate is not verified")]
    UnverifiedCa,
    /// The chain is valid for an enrollment (or the closest group) that is disabled.
    #[error("the matching enrollment is disabled")]
    Disabled,
}

/// Why path validation (rustls-webpki) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A certificate on the path (or the group certificate) has expired.
    #[error("a certificate has expired")]
    Expired,
    /// A certificate on the path (or the group certificate) is not valid yet.
    #[error("a certificate is not valid yet")]
    NotYetValid,
    /// The leaf has an EKU extension without clientAuth.
    #[error("the certificate is not valid for client authentication")]
    RequiredEkuNotFound,
    /// A name in the leaf or an intermediate violates a CA's name constraints.
    #[error("a name violates a CA's name constraints")]
    NameConstraintViolation,
    /// A CA's pathLenConstraint is exceeded.
    #[error("a CA's path length constraint is exceeded")]
    PathLenConstraintViolated,
    /// The leaf is a CA certificate.
    #[error("a CA certificate was presented as the device certificate")]
    CaUsedAsEndEntity,
    /// A certificate that signs another one is not a CA.
    #[error("an end-entity certificate was used as a CA")]
    EndEntityUsedAsCa,
    /// No path from the leaf to the group certificate through the presented chain.
    #[error("no path to the enrollment group's certificate")]
    UnknownIssuer,
    /// A signature does not verify.
    #[error("a signature does not verify")]
    BadSignature,
    /// A signature algorithm is not supported.
    #[error("unsupported signature algorithm")]
    UnsupportedSignatureAlgorithm,
    /// Anything else webpki reports; the text is webpki's `Debug` output.
    #[error("{0}")]
    Other(String),
}

impl From<webpki::Error> for ChainError {
    fn from(e: webpki::Error) -> Self {
        use webpki::Error as E;
        match e {
            E::CertExpired { .. } => ChainError::Expired,
            E::CertNotValidYet { .. } => ChainError::NotYetValid,
            // The unit variants without context are deprecated and no longer produced.
            E::RequiredEkuNotFoundContext(_) => ChainError::RequiredEkuNotFound,
            E::NameConstraintViolation => ChainError::NameConstraintViolation,
            E::PathLenConstraintViolated => ChainError::PathLenConstraintViolated,
            E::CaUsedAsEndEntity => ChainError::CaUsedAsEndEntity,
            E::EndEntityUsedAsCa => ChainError::EndEntityUsedAsCa,
            E::UnknownIssuer => ChainError::UnknownIssuer,
            E::InvalidSignatureForPublicKey => ChainError::BadSignature,
            E::UnsupportedSignatureAlgorithmContext(_)
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
                ChainError::UnsupportedSignatureAlgorithm
            }
            other => ChainError::Other(format!("{other:?}")),
        }
    }
}

impl Attestor for X509Attestor {
    type Evidence = X509Evidence;
    type Error = X509AttestationError;

    /// See the module documentation for the order of checks.
    fn attest(
        &self,
        evidence: &X509Evidence,
        now_unix: u64,
    ) -> Result<AttestedIdentity, X509AttestationError> {
        if evidence.chain.len() > MAX_CHAIN_LEN {
            return Err(X509AttestationError::ChainTooLong);
        }
        let leaf =
            Certificate::from_der(&evidence.leaf).map_err(X509AttestationError::BadCertificate)?;
        let chain = evidence
            .chain
            .iter()
            .map(|der| Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(X509AttestationError::BadCertificate)?;
        if leaf.common_name() != Some(evidence.registration_id.as_str()) {
            return Err(X509AttestationError::CnMismatch);
        }
        let now = i64::try_from(now_unix).unwrap_or(i64::MAX);

        let (matched, signing_certificate_info) = match &self.individual {
            Some(individual) => {
                check_individual(individual, &leaf, now)?;
                (
                    EnrollmentRef::Individual(evidence.registration_id.clone()),
                    None,
                )
            }
            None => {
                let (group, anchor) = self.match_group(&leaf, &chain, evidence, now_unix)?;
                (
                    EnrollmentRef::Group(group.group_id.clone()),
                    Some(anchor.info().clone()),
                )
            }
        };

        Ok(AttestedIdentity {
            registration_id: evidence.registration_id.clone(),
            mechanism: Mechanism::X509,
            matched,
            certificate_info: Some(leaf.info().clone()),
            signing_certificate_info,
            expires_at: u64::try_from(leaf.not_after_unix()).ok(),
        })
    }
}

impl X509Attestor {
    /// Steps 3–6 of the module documentation: the closest group, validated, trusted, enabled.
    ///
    /// If several group certificates issued the same closest certificate (two groups share a
    /// CA), each is validated; if any that validates belongs to a disabled group the answer is
    /// [`X509AttestationError::Disabled`] (fail closed), otherwise the first in `groups` order
    /// wins. If none validates, the first one's error is returned, unless each failed because
    /// its key signed nothing on the path (a name collision): then the walk goes on upward.
    fn match_group(
        &self,
        leaf: &Certificate,
        chain: &[Certificate],
        evidence: &X509Evidence,
        now_unix: u64,
    ) -> Result<(&X509Group, Certificate), X509AttestationError> {
        let intermediates: Vec<CertificateDer<'_>> = evidence
            .chain
            .iter()
            .map(|der| CertificateDer::from(der.as_slice()))
            .collect();
        for candidates in self.group_certificates_by_level(leaf, chain) {
            let mut accepted = None;
            let mut disabled = false;
            let mut first_error = None;
            for (group, group_certificate, anchor) in candidates {
                let checked = validate_path(&evidence.leaf, &intermediates, &anchor, now_unix)
                    .and_then(|()| self.check_trusted(group_certificate, &anchor, chain));
                match checked {
                    Ok(()) if !group.enabled => disabled = true,
                    Ok(()) => {
                        accepted.get_or_insert((group, anchor));
                    }
                    // A certificate with the issuer's name whose key did not sign: not an
                    // issuer at all, so this level does not count.
                    Err(X509AttestationError::Chain(
                        ChainError::UnknownIssuer | ChainError::BadSignature,
                    )) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if disabled {
                return Err(X509AttestationError::Disabled);
            }
            if let Some(found) = accepted {
                return Ok(found);
            }
            // The closest group that did issue the chain decides, even when it refuses.
            if let Some(error) = first_error {
                return Err(error);
            }
        }
        Err(X509AttestationError::UnknownIssuer)
    }

    /// The group certificates named as the leaf's issuer, then as its issuer's issuer in the
    /// presented chain, and so on upward: one list per level that has any. Names only; the
    /// signatures are webpki's to verify. Group certificates that do not parse are skipped
    /// (they cannot have issued anything).
    fn group_certificates_by_level<'s>(
        &'s self,
        leaf: &Certificate,
        chain: &[Certificate],
    ) -> Vec<Vec<(&'s X509Group, &'s GroupCertificate, Certificate)>> {
        let parsed: Vec<(&X509Group, &GroupCertificate, Certificate)> = self
            .groups
            .iter()
            .flat_map(|group| group.certificates.iter().map(move |gc| (group, gc)))
            .filter_map(|(group, gc)| {
                Certificate::from_der(gc.der())
                    .ok()
                    .map(|cert| (group, gc, cert))
            })
            .collect();

        let mut levels = Vec::new();
        let mut current = leaf;
        // Each step moves to a different certificate of `chain`, so this bounds the walk even
        // if the chain contains a cycle.
        for _ in 0..=chain.len() {
            let here: Vec<_> = parsed
                .iter()
                .filter(|(_, _, cert)| current.is_issued_by_name(cert))
                .cloned()
                .collect();
            if !here.is_empty() {
                levels.push(here);
            }
            match chain
                .iter()
                .find(|parent| parent.der() != current.der() && current.is_issued_by_name(parent))
            {
                Some(parent) => current = parent,
                None => break,
            }
        }
        levels
    }

    /// Step 5: is the matched group certificate trusted?
    fn check_trusted(
        &self,
        group_certificate: &GroupCertificate,
        anchor: &Certificate,
        chain: &[Certificate],
    ) -> Result<(), X509AttestationError> {
        match group_certificate {
            GroupCertificate::CaReference { verified: true, .. } => Ok(()),
            GroupCertificate::CaReference {
                verified: false, ..
            } => Err(X509AttestationError::UnverifiedCa),
            GroupCertificate::Signing(_) => {
                let verified: Vec<Certificate> = self
                    .verified_cas
                    .iter()
                    .filter_map(|der| Certificate::from_der(der).ok())
                    .collect();
                if rolls_up_to_verified(anchor, chain, &verified) {
                    Ok(())
                } else {
                    Err(X509AttestationError::UnverifiedCa)
                }
            }
        }
    }
}

/// Step 2: the leaf is one of the enrollment's certificates, valid now, and it is enabled.
fn check_individual(
    individual: &X509Enrollment,
    leaf: &Certificate,
    now: i64,
) -> Result<(), X509AttestationError> {
    let enrolled = [&individual.primary, &individual.secondary]
        .into_iter()
        .flatten()
        .any(|c| client_certificate_matches(c, leaf));
    if !enrolled {
        return Err(X509AttestationError::CertificateMismatch);
    }
    // The same rule path validation applies to group devices: a server-only certificate is no
    // device credential.
    if !leaf.allows_client_auth() {
        return Err(X509AttestationError::Chain(ChainError::RequiredEkuNotFound));
    }
    if now < leaf.not_before_unix() {
        return Err(X509AttestationError::NotYetValid);
    }
    if now > leaf.not_after_unix() {
        return Err(X509AttestationError::Expired);
    }
    if !individual.enabled {
        return Err(X509AttestationError::Disabled);
    }
    Ok(())
}

/// Whether `leaf` is the enrolled certificate: equal DER, or the enrolled SHA-1 or SHA-256
/// thumbprint.
fn client_certificate_matches(enrolled: &ClientCertificate, leaf: &Certificate) -> bool {
    match enrolled {
        ClientCertificate::Der(der) => der.as_slice() == leaf.der(),
        ClientCertificate::Thumbprint(thumbprint) => {
            let normalized: String = thumbprint
                .chars()
                .filter(|c| !matches!(c, ':' | ' '))
                .collect();
            match normalized.len() {
                40 => normalized.eq_ignore_ascii_case(&leaf.info().sha1_thumbprint),
                64 => normalized.eq_ignore_ascii_case(&leaf.info().sha256_thumbprint),
                _ => false,
            }
        }
    }
}

/// `child`'s issuer name is `parent`'s subject and `parent`'s key signed it.
fn issued(parent: &Certificate, child: &Certificate) -> bool {
    child.is_issued_by_name(parent) && child.is_signed_by(parent)
}

/// Step 4: rustls-webpki path validation from the leaf to `anchor`, plus what webpki does not
/// check on a trust anchor: that it is a CA and valid now.
fn validate_path(
    leaf_der: &[u8],
    intermediates: &[CertificateDer<'_>],
    anchor: &Certificate,
    now_unix: u64,
) -> Result<(), X509AttestationError> {
    let chain_error = |e: webpki::Error| X509AttestationError::Chain(ChainError::from(e));
    if !anchor.is_ca() {
        return Err(X509AttestationError::Chain(ChainError::EndEntityUsedAsCa));
    }
    let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
    if now < anchor.not_before_unix() {
        return Err(X509AttestationError::Chain(ChainError::NotYetValid));
    }
    if now > anchor.not_after_unix() {
        return Err(X509AttestationError::Chain(ChainError::Expired));
    }
    let anchor_der = CertificateDer::from(anchor.der());
    let trust_anchor = anchor_from_trusted_cert(&anchor_der).map_err(chain_error)?;
    let leaf_der = CertificateDer::from(leaf_der);
    let end_entity = EndEntityCert::try_from(&leaf_der).map_err(chain_error)?;
    end_entity
        .verify_for_usage(
            ALL_VERIFICATION_ALGS,
            &[trust_anchor],
            intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(now_unix)),
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(chain_error)
}

/// Whether `cert` is a verified CA, or is issued by one, or its issuer in `chain` rolls up to
/// one. Every issuer on the way must be a CA.
fn rolls_up_to_verified(
    cert: &Certificate,
    chain: &[Certificate],
    verified: &[Certificate],
) -> bool {
    let mut current = cert;
    for _ in 0..=chain.len() {
        if verified
            .iter()
            .any(|v| v.der() == current.der() || (v.is_ca() && issued(v, current)))
        {
            return true;
        }
        match chain.iter().find(|parent| {
            parent.der() != current.der() && parent.is_ca() && issued(parent, current)
        }) {
            Some(parent) => current = parent,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests;
