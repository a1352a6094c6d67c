//! Device certificates issued from a PKCS#10 CSR (DPS `csr`, spec §1.4–1.5).
//!
//! The CSR is trusted for exactly two things: its public key (the signature proves the device
//! holds the private key) and its subject CN (which must be the registration id). Everything
//! else it asks for (extensions, other subject attributes) is ignored; the issued certificate
//! follows the device profile in [`crate::CaHierarchy::sign_device_csr`].

use rcgen::{CustomExtension, KeyUsagePurpose};
use url::Url;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use yasna::Tag;
use yasna::models::ObjectIdentifier;

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

/// How [`crate::CaHierarchy::sign_device_csr_with`] issues a device certificate: its validity
/// and where relying parties find revocation information and the issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuanceProfile {
    /// Validity in days from issuance (at least 1, not past the intermediate's expiry).
    pub validity_days: u32,
    /// Written as the cRLDistributionPoints extension (RFC 5280 §4.2.1.13).
    pub crl_distribution_point: Option<Url>,
    /// Written as an id-ad-ocsp entry of authorityInfoAccess (RFC 5280 §4.2.2.1).
    pub ocsp_responder: Option<Url>,
    /// Written as an id-ad-caIssuers entry of authorityInfoAccess: where the intermediate
    /// certificate can be downloaded (DER or certs-only PKCS#7).
    pub ca_issuers: Option<Url>,
}

impl IssuanceProfile {
    /// A profile with this validity and no URLs: what [`crate::CaHierarchy::sign_device_csr`]
    /// issues.
    pub fn new(validity_days: u32) -> Self {
        IssuanceProfile {
            validity_days,
            crl_distribution_point: None,
            ocsp_responder: None,
            ca_issuers: None,
        }
    }

    /// The authorityInfoAccess extension for the profile's OCSP and CA-issuers URLs, if it
    /// has any.
    pub(crate) fn authority_info_access(&self) -> Option<CustomExtension> {
        let entries: Vec<(&[u64], &Url)> = [
            (ID_AD_OCSP, self.ocsp_responder.as_ref()),
            (ID_AD_CA_ISSUERS, self.ca_issuers.as_ref()),
        ]
        .into_iter()
        .filter_map(|(oid, url)| url.map(|url| (oid, url)))
        .collect();
        if entries.is_empty() {
            return None;
        }
        // AuthorityInfoAccessSyntax ::= SEQUENCE SIZE (1..MAX) OF AccessDescription
        // AccessDescription ::= SEQUENCE { accessMethod OID, accessLocation GeneralName }
        // with the uniformResourceIdentifier [6] IA5String choice. A `Url` serializes as ASCII
        // only (punycode, percent-encoding), which is what IA5String needs.
        let der = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                for (oid, url) in &entries {
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&ObjectIdentifier::from_slice(oid));
                        w.next().write_tagged_implicit(Tag::context(6), |w| {
                            w.write_ia5_string(url.as_str())
                        });
                    });
                }
            })
        });
        Some(CustomExtension::from_oid_content(
            ID_PE_AUTHORITY_INFO_ACCESS,
            der,
        ))
    }
}

/// id-pe-authorityInfoAccess (RFC 5280 §4.2.2.1).
const ID_PE_AUTHORITY_INFO_ACCESS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];
/// id-ad-ocsp.
const ID_AD_OCSP: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1];
/// id-ad-caIssuers.
const ID_AD_CA_ISSUERS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 2];

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
