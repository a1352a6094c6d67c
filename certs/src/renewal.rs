//! Renewal policy: when may a device renew its certificate, and is the new request a
//! renewal of the old certificate. Pure functions of their arguments (times are Unix seconds).

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::X509Name;

use crate::{Error, pem};

/// When renewal is allowed, relative to a certificate's lifetime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// The fraction of the lifetime (`notBefore` to `notAfter`) that must have elapsed before
    /// renewal opens: `0.0` = any time, `2.0 / 3.0` = in the last third. Must be finite and
    /// within `0.0..=1.0`.
    pub window_fraction: f64,
    /// How long after `notAfter` an expired certificate may still renew; `None` = never.
    pub grace_after_expiry_seconds: Option<u64>,
}

/// Why [`decide`] refused a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenewalRefusal {
    /// The renewal window has not opened yet.
    #[error("renewal opens at {opens_at_unix}")]
    TooEarly {
        /// When it opens, Unix seconds.
        opens_at_unix: i64,
    },
    /// The certificate expired and no (or no more) grace applies.
    #[error("the certificate expired at {not_after_unix}")]
    Expired {
        /// The certificate's `notAfter`.
        not_after_unix: i64,
        /// When the grace period ended, if the policy has one.
        grace_ended_at_unix: Option<i64>,
    },
    /// `notAfter` is not after `notBefore`.
    #[error("the certificate's validity period is empty")]
    InvalidValidity,
    /// The policy's `window_fraction` is not a finite number within 0..=1.
    #[error("invalid renewal policy")]
    InvalidPolicy,
}

impl RenewalPolicy {
    /// Renewal from two thirds of the lifetime, no renewal after expiry.
    pub const DEFAULT: RenewalPolicy = RenewalPolicy {
        window_fraction: 2.0 / 3.0,
        grace_after_expiry_seconds: None,
    };

    /// Whether `window_fraction` is usable; check this when loading configuration.
    pub fn is_valid(&self) -> bool {
        self.window_fraction.is_finite() && (0.0..=1.0).contains(&self.window_fraction)
    }

    /// When renewal opens for a certificate valid from `not_before` to `not_after`
    /// (rounded up to the second).
    pub fn opens_at(&self, not_before: i64, not_after: i64) -> Result<i64, RenewalRefusal> {
        if !self.is_valid() {
            return Err(RenewalRefusal::InvalidPolicy);
        }
        if not_after <= not_before {
            return Err(RenewalRefusal::InvalidValidity);
        }
        // Lifetimes are far below 2^53 seconds, so f64 holds them exactly; the product is
        // within 0..=lifetime because the fraction is within 0..=1.
        let lifetime = not_after.abs_diff(not_before) as f64;
        let offset = (lifetime * self.window_fraction).ceil() as i64;
        Ok(not_before.saturating_add(offset).min(not_after))
    }
}

/// Whether a certificate valid from `not_before` to `not_after` (inclusive, RFC 5280) may be
/// renewed at `now`.
///
/// Allowed from [`RenewalPolicy::opens_at`] through `notAfter`, and after it for up to
/// `grace_after_expiry_seconds` (inclusive) when the policy has a grace period.
pub fn decide(
    policy: &RenewalPolicy,
    not_before: i64,
    not_after: i64,
    now: i64,
) -> Result<(), RenewalRefusal> {
    let opens_at = policy.opens_at(not_before, not_after)?;
    if now < opens_at {
        return Err(RenewalRefusal::TooEarly {
            opens_at_unix: opens_at,
        });
    }
    if now <= not_after {
        return Ok(());
    }
    let grace_ends = policy
        .grace_after_expiry_seconds
        .map(|grace| match i64::try_from(grace) {
            Ok(grace) => not_after.saturating_add(grace),
            Err(_) => i64::MAX,
        });
    match grace_ends {
        Some(ends) if now <= ends => Ok(()),
        _ => Err(RenewalRefusal::Expired {
            not_after_unix: not_after,
            grace_ended_at_unix: grace_ends,
        }),
    }
}

/// Whether the CSR (DER) asks for a certificate on the same key as `old_cert_der`: equal
/// SubjectPublicKeyInfo (algorithm, parameters and key). A re-key (EST `/serverkeygen` or a
/// new key in `/simplereenroll`) is a different key; it is accepted or not by the caller,
/// which knows the TLS client certificate that authenticated the request.
pub fn same_public_key(old_cert_der: &[u8], new_csr_der: &[u8]) -> Result<bool, Error> {
    let cert = parse_cert(old_cert_der)?;
    let csr = parse_csr(new_csr_der)?;
    Ok(cert.public_key().raw == csr.certification_request_info.subject_pki.raw)
}

/// Whether the CSR's subject equals the certificate's (RFC 7030 §4.2.2: a reenroll keeps the
/// subject). Equal means the same RDNs in the same order, each with the same attributes and
/// string values; the string type (UTF8String vs PrintableString) may differ.
pub fn same_subject(cert_der: &[u8], csr_der: &[u8]) -> Result<bool, Error> {
    let cert = parse_cert(cert_der)?;
    let csr = parse_csr(csr_der)?;
    Ok(names_equal(
        cert.subject(),
        &csr.certification_request_info.subject,
    ))
}

fn names_equal(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    if a.as_raw() == b.as_raw() {
        return true;
    }
    let (a, b): (Vec<_>, Vec<_>) = (a.iter().collect(), b.iter().collect());
    a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| {
            let (x, y): (Vec<_>, Vec<_>) = (x.iter().collect(), y.iter().collect());
            x.len() == y.len()
                && x.iter().zip(&y).all(|(p, q)| {
                    p.attr_type() == q.attr_type()
                        && match (p.as_str(), q.as_str()) {
                            (Ok(p), Ok(q)) => p == q,
                            _ => p.attr_value().data == q.attr_value().data,
                        }
                })
        })
}

fn parse_cert(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, Error> {
    pem::parse_der(der, "certificate").map_err(|e| Error::InvalidCertificate {
        reason: e.to_string(),
    })
}

fn parse_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>, Error> {
    match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => Ok(csr),
        Ok(_) => Err(Error::InvalidCsr {
            reason: "trailing data after the CSR".into(),
        }),
        Err(e) => Err(Error::InvalidCsr {
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests;
