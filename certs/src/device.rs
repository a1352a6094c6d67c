//! Device certificates issued from a PKCS#10 CSR (DPS `csr`, spec §1.4–1.5).
//!
//! The CSR is trusted for exactly two things: its public key (the signature proves the device
//! holds the private key) and its subject CN (which must be the registration id). Everything
//! else it asks for (extensions, other subject attributes) is ignored; the issued certificate
//! follows the device profile in [`crate::CaHierarchy::sign_device_csr`].

use rcgen::KeyUsagePurpose;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;

use crate::Error;

/// A device certificate issued from a CSR, with the chain DPS returns as
/// `issuedCertificateChain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedDeviceCertificate {
    /// The device certificate (DER).
    pub certificate_der: Vec<u8>,
    /// The device certificate (PEM).
    pub certificate_pem: String,
    /// Leaf, intermediate, root (DER): the `issuedCertificateChain` order.
    pub chain_der: Vec<Vec<u8>>,
    /// The serial number, upper-case hex (16 bytes, no leading `00`).
    pub serial_hex: String,
    /// `notBefore`, Unix seconds.
    pub not_before_unix: i64,
    /// `notAfter`, Unix seconds.
    pub not_after_unix: i64,
    /// The subject, `CN={registration id}`.
    pub subject: String,
}

/// What is taken from a CSR after its signature checked out.
pub(crate) struct VerifiedCsr {
    /// The SubjectPublicKeyInfo (DER).
    pub spki: rcgen::SubjectPublicKeyInfo,
    /// Key usages that fit the key type.
    pub key_usages: Vec<KeyUsagePurpose>,
}

/// Parses `csr_der`, verifies its self-signature, checks its subject CN is `expected_cn` and
/// picks the key usages for its key type.
pub(crate) fn verify_csr(csr_der: &[u8], expected_cn: &str) -> Result<VerifiedCsr, Error> {
    let invalid = |reason: &str| Error::InvalidCsr {
        reason: reason.to_owned(),
    };
    let csr = match X509CertificationRequest::from_der(csr_der) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(invalid("trailing data after the CSR")),
        Err(e) => {
            return Err(Error::InvalidCsr {
                reason: e.to_string(),
            });
        }
    };
    let algorithm = &csr.signature_algorithm.algorithm;
    if *algorithm == OID_PKCS1_SHA1WITHRSA || *algorithm == OID_SHA1_WITH_RSA {
        return Err(invalid("SHA-1 signatures are not accepted"));
    }
    csr.verify_signature()
        .map_err(|_| Error::CsrSignatureInvalid)?;

    let info = &csr.certification_request_info;
    let mut common_names = info.subject.iter_common_name();
    let found = match (common_names.next(), common_names.next()) {
        (Some(cn), None) => cn.as_str().ok(),
        _ => None,
    };
    if expected_cn.is_empty() || found != Some(expected_cn) {
        return Err(Error::CnMismatch {
            expected: expected_cn.to_owned(),
            found: found.map(str::to_owned),
        });
    }

    let key_algorithm = &info.subject_pki.algorithm.algorithm;
    let key_usages = if *key_algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ]
    } else if *key_algorithm == OID_PKCS1_RSAENCRYPTION {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else if *key_algorithm == OID_SIG_ED25519 {
        vec![KeyUsagePurpose::DigitalSignature]
    } else {
        return Err(invalid("unsupported public key algorithm"));
    };
    // rcgen's own CSR parser refuses requested extensions it does not know (an openssl CSR
    // with subjectKeyIdentifier, say); taking only the key sidesteps that and ignores every
    // request by construction.
    let spki = rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw).map_err(|e| {
        Error::InvalidCsr {
            reason: e.to_string(),
        }
    })?;
    Ok(VerifiedCsr { spki, key_usages })
}

#[cfg(test)]
mod tests;
