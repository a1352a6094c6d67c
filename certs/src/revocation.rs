//! Certificate revocation lists (RFC 5280 §5): X.509 v2 CRLs signed by the intermediate, and
//! the reason codes shared with OCSP.
//!
//! The crate does not decide *what* is revoked: the caller passes the revoked serials (from
//! storage), a CRL number it keeps monotonic, and the times. Signing uses rcgen's CRL writer
//! with the intermediate's key, so the CRL carries the authority key identifier and the CRL
//! number extensions RFC 5280 requires.

use std::fmt;
use std::str::FromStr;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams};
use time::OffsetDateTime;

use crate::{CaHierarchy, Error, pem};

/// RFC 5280 §5.3.1 `CRLReason` (also used by OCSP `revocationReason`). Value 7 is unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// `unspecified` (0). Written as "no reason" in CRLs, as RFC 5280 recommends.
    Unspecified,
    /// `keyCompromise` (1).
    KeyCompromise,
    /// `cACompromise` (2).
    CaCompromise,
    /// `affiliationChanged` (3).
    AffiliationChanged,
    /// `superseded` (4).
    Superseded,
    /// `cessationOfOperation` (5).
    CessationOfOperation,
    /// `certificateHold` (6).
    CertificateHold,
    /// `removeFromCRL` (8); only meaningful in delta CRLs.
    RemoveFromCrl,
    /// `privilegeWithdrawn` (9).
    PrivilegeWithdrawn,
    /// `aACompromise` (10).
    AaCompromise,
}

impl ReasonCode {
    /// Every reason code, in numeric order.
    pub const ALL: [ReasonCode; 10] = [
        ReasonCode::Unspecified,
        ReasonCode::KeyCompromise,
        ReasonCode::CaCompromise,
        ReasonCode::AffiliationChanged,
        ReasonCode::Superseded,
        ReasonCode::CessationOfOperation,
        ReasonCode::CertificateHold,
        ReasonCode::RemoveFromCrl,
        ReasonCode::PrivilegeWithdrawn,
        ReasonCode::AaCompromise,
    ];

    /// The numeric value (the ENUMERATED on the wire).
    pub fn code(self) -> u8 {
        match self {
            ReasonCode::Unspecified => 0,
            ReasonCode::KeyCompromise => 1,
            ReasonCode::CaCompromise => 2,
            ReasonCode::AffiliationChanged => 3,
            ReasonCode::Superseded => 4,
            ReasonCode::CessationOfOperation => 5,
            ReasonCode::CertificateHold => 6,
            ReasonCode::RemoveFromCrl => 8,
            ReasonCode::PrivilegeWithdrawn => 9,
            ReasonCode::AaCompromise => 10,
        }
    }

    /// The reason with this numeric value, if there is one (7 and 11+ are not).
    pub fn from_code(code: u8) -> Option<ReasonCode> {
        ReasonCode::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The RFC 5280 name, e.g. `keyCompromise`, `cACompromise`, `removeFromCRL`.
    pub fn name(self) -> &'static str {
        match self {
            ReasonCode::Unspecified => "unspecified",
            ReasonCode::KeyCompromise => "keyCompromise",
            ReasonCode::CaCompromise => "cACompromise",
            ReasonCode::AffiliationChanged => "affiliationChanged",
            ReasonCode::Superseded => "superseded",
            ReasonCode::CessationOfOperation => "cessationOfOperation",
            ReasonCode::CertificateHold => "certificateHold",
            ReasonCode::RemoveFromCrl => "removeFromCRL",
            ReasonCode::PrivilegeWithdrawn => "privilegeWithdrawn",
            ReasonCode::AaCompromise => "aACompromise",
        }
    }

    fn to_rcgen(self) -> Option<RevocationReason> {
        Some(match self {
            ReasonCode::Unspecified => return None,
            ReasonCode::KeyCompromise => RevocationReason::KeyCompromise,
            ReasonCode::CaCompromise => RevocationReason::CaCompromise,
            ReasonCode::AffiliationChanged => RevocationReason::AffiliationChanged,
            ReasonCode::Superseded => RevocationReason::Superseded,
            ReasonCode::CessationOfOperation => RevocationReason::CessationOfOperation,
            ReasonCode::CertificateHold => RevocationReason::CertificateHold,
            ReasonCode::RemoveFromCrl => RevocationReason::RemoveFromCrl,
            ReasonCode::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
            ReasonCode::AaCompromise => RevocationReason::AaCompromise,
        })
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that is not one of the RFC 5280 reason names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown revocation reason {0:?}")]
pub struct UnknownReasonCode(pub String);

impl FromStr for ReasonCode {
    type Err = UnknownReasonCode;

    /// Parses an RFC 5280 name (`keyCompromise`, `cACompromise`, ...). ASCII case is ignored,
    /// so `KeyCompromise` and `cacompromise` are accepted too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReasonCode::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownReasonCode(s.chars().take(64).collect()))
    }
}

/// One revoked certificate in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// The certificate's serial number, big-endian magnitude (leading zero bytes allowed).
    pub serial: Vec<u8>,
    /// When it was revoked, Unix seconds.
    pub revoked_at_unix: i64,
    /// Why, if known. `Some(Unspecified)` is written like `None` (no reasonCode extension).
    pub reason: Option<ReasonCode>,
}

/// What goes into a CRL besides the issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlParams {
    /// The CRL number: the caller keeps it strictly increasing per issuer.
    pub crl_number: u64,
    /// `thisUpdate`, Unix seconds.
    pub this_update_unix: i64,
    /// `nextUpdate`, Unix seconds; must be after `thisUpdate`.
    pub next_update_unix: i64,
    /// The revoked certificates (may be empty).
    pub revoked: Vec<RevokedEntry>,
}

/// A signed CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCrl {
    /// DER: what `application/pkix-crl` carries (RFC 5280 §4.2.1.13 distribution points).
    pub der: Vec<u8>,
    /// PEM (`X509 CRL` label).
    pub pem: String,
}

/// Parses a serial number written in hex (as [`crate::IssuedDeviceCertificate::serial_hex`]
/// or `openssl x509 -serial` print it, colons and case ignored) into bytes.
pub fn parse_serial_hex(hex: &str) -> Result<Vec<u8>, Error> {
    let digits: Vec<u8> = hex.bytes().filter(|b| *b != b':').collect();
    let invalid = || Error::InvalidSerial(hex.chars().take(80).collect());
    if digits.is_empty() || !digits.len().is_multiple_of(2) || digits.len() > 2 * MAX_SERIAL_BYTES {
        return Err(invalid());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(invalid)
        })
        .collect()
}

/// RFC 5280 §4.1.2.2 allows 20 octets; one more for a leading zero written by some CAs.
const MAX_SERIAL_BYTES: usize = 21;

impl CaHierarchy {
    /// Builds and signs a CRL with the intermediate's key: the CRL for every certificate the
    /// intermediate issued (devices and servers).
    ///
    /// Version 2, signature algorithm of the intermediate's key, issuer = the intermediate's
    /// subject, extensions authorityKeyIdentifier and cRLNumber; each entry has its
    /// revocation date and, unless the reason is absent or unspecified, a reasonCode. Entries
    /// are written in the given order. Refuses an empty or over-long serial
    /// ([`Error::InvalidSerial`]), `nextUpdate` not after `thisUpdate`
    /// ([`Error::InvalidCrl`]) and times outside the representable range
    /// ([`Error::InvalidTime`]).
    pub fn sign_crl(&self, params: &CrlParams) -> Result<SignedCrl, Error> {
        let this_update = unix_time(params.this_update_unix)?;
        let next_update = unix_time(params.next_update_unix)?;
        if next_update <= this_update {
            return Err(Error::InvalidCrl {
                reason: "nextUpdate must be after thisUpdate".into(),
            });
        }
        let revoked_certs = params
            .revoked
            .iter()
            .map(|entry| {
                if entry.serial.is_empty() || entry.serial.len() > MAX_SERIAL_BYTES {
                    return Err(Error::InvalidSerial(format!(
                        "{} bytes",
                        entry.serial.len()
                    )));
                }
                Ok(RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&entry.serial),
                    revocation_time: unix_time(entry.revoked_at_unix)?,
                    reason_code: entry.reason.and_then(ReasonCode::to_rcgen),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let crl = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: rcgen::SerialNumber::from(params.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .map_err(|e| Error::InvalidCrl {
            reason: e.to_string(),
        })?;
        let der = crl.der().to_vec();
        Ok(SignedCrl {
            pem: pem::encode("X509 CRL", &der),
            der,
        })
    }
}

fn unix_time(unix: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| Error::InvalidTime(unix))
}

#[cfg(test)]
mod tests;
