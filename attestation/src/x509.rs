//! X.509 attestation building blocks: parsing uploaded or presented certificates, the Azure
//! `X509CertificateInfo` summary, signature checks and CA proof-of-possession (§3.3, §4.4, §5.6).
//!
//! [`X509Attestor`] decides which enrollment a presented chain belongs to (individual by
//! certificate, else the closest group up the chain) and validates the path with
//! rustls-webpki; see its module documentation for the order of checks.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;

/// Why a certificate input was rejected. All of these mean "bad request" for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// The input is empty or only whitespace.
    #[error("no certificate given")]
    Empty,
    /// The input (or a PEM block body) is not base64.
    #[error("certificate is not valid base64")]
    NotBase64,
    /// The bytes are not one DER X.509 certificate; the text says why.
    #[error("not an X.509 certificate: {0}")]
    NotACertificate(String),
    /// The PEM input holds more than one certificate where exactly one is expected.
    #[error("expected one certificate, found {0}")]
    MultipleCertificates(usize),
}

/// Why a CA proof-of-possession was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PopError {
    /// The verification certificate could not be parsed.
    #[error("verification certificate: {0}")]
    Parse(#[from] X509Error),
    /// The verification certificate's subject CN is not the verification code.
    #[error("the verification certificate's common name is not the verification code")]
    CommonNameMismatch,
    /// The verification certificate is not signed by the CA's key.
    #[error("the verification certificate is not signed by the CA certificate's key")]
    SignatureInvalid,
    /// The verification certificate's validity ended before now.
    #[error("the verification certificate has expired")]
    Expired,
    /// The verification certificate's validity starts after now.
    #[error("the verification certificate is not valid yet")]
    NotYetValid,
}

/// The server-computed summary Azure returns next to a certificate (`X509CertificateInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    /// Subject DN as x509-parser prints it, e.g. `CN=device-01, O=Contoso`.
    pub subject_name: String,
    /// SHA-1 over the DER, upper-case hex without separators.
    pub sha1_thumbprint: String,
    /// SHA-256 over the DER, upper-case hex without separators.
    pub sha256_thumbprint: String,
    /// Issuer DN, same format as `subject_name`.
    pub issuer_name: String,
    /// `notBefore`, RFC 3339 UTC, e.g. `2024-01-01T00:00:00Z`.
    pub not_before_utc: String,
    /// `notAfter`, RFC 3339 UTC.
    pub not_after_utc: String,
    /// Serial number, upper-case hex of the DER INTEGER content (a leading `00` is kept).
    pub serial_number: String,
    /// Certificate version as people count it: 3 for v3.
    pub version: i32,
}

/// A parsed certificate: its DER and what attestation needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    der: Vec<u8>,
    info: CertificateInfo,
    is_ca: bool,
    common_name: Option<String>,
    subject_raw: Vec<u8>,
    issuer_raw: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

impl Certificate {
    /// Parses exactly one DER certificate (no trailing bytes).
    pub fn from_der(der: &[u8]) -> Result<Certificate, X509Error> {
        if der.is_empty() {
            return Err(X509Error::Empty);
        }
        let cert = parse_der(der)?;
        let validity = cert.validity();
        let info = CertificateInfo {
            subject_name: cert.subject().to_string(),
            sha1_thumbprint: hex::encode_upper(
                digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref(),
            ),
            sha256_thumbprint: hex::encode_upper(digest::digest(&digest::SHA256, der).as_ref()),
            issuer_name: cert.issuer().to_string(),
            not_before_utc: rfc3339(validity.not_before.to_datetime())?,
            not_after_utc: rfc3339(validity.not_after.to_datetime())?,
            serial_number: hex::encode_upper(cert.raw_serial()),
            version: i32::try_from(cert.version().0.saturating_add(1)).unwrap_or(i32::MAX),
        };
        let mut common_names = cert.subject().iter_common_name();
        let common_name = match (common_names.next(), common_names.next()) {
            (Some(cn), None) => cn.as_str().ok().map(str::to_owned),
            _ => None,
        };
        Ok(Certificate {
            der: der.to_vec(),
            info,
            is_ca: cert.is_ca(),
            common_name,
            subject_raw: cert.subject().as_raw().to_vec(),
            issuer_raw: cert.issuer().as_raw().to_vec(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The Azure-style summary.
    pub fn info(&self) -> &CertificateInfo {
        &self.info
    }

    /// Whether `basicConstraints` says CA:TRUE.
    pub fn is_ca(&self) -> bool {
        self.is_ca
    }

    /// The subject CN, if the subject has exactly one CN and it is a text string type
    /// (UTF8String, PrintableString, IA5String or NumericString). Several CNs make the name
    /// ambiguous, so they yield `None` rather than a guess.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// `notBefore` as Unix seconds.
    pub fn not_before_unix(&self) -> i64 {
        self.not_before
    }

    /// `notAfter` as Unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
    }

    /// The one rule for a device's client certificate, wherever a device presents one (DPS,
    /// the hub over MQTT and HTTPS, EST): no extended key usage extension at all, or one that
    /// lists clientAuth. anyExtendedKeyUsage alone is not enough, and neither is an empty
    /// extension. This is the rule rustls-webpki applies to group chains
    /// (`KeyUsage::client_auth`, "required if present"); a test in `attestor/tests.rs` pins
    /// that the two agree.
    pub fn allows_client_auth(&self) -> bool {
        match x509_parser::parse_x509_certificate(&self.der) {
            Ok((_, cert)) => match cert.extended_key_usage() {
                Ok(Some(eku)) => eku.value.client_auth,
                Ok(None) => true,
                Err(_) => false,
            },
            Err(_) => false,
        }
    }

    /// Whether `now_unix` lies within `notBefore..=notAfter`.
    pub fn is_valid_at(&self, now_unix: i64) -> bool {
        (self.not_before..=self.not_after).contains(&now_unix)
    }

    /// Whether this certificate's signature verifies with `issuer`'s public key.
    ///
    /// Only the signature is checked (RSA PKCS#1/PSS, ECDSA P-256/P-384 and Ed25519, as ring
    /// supports them); names, validity and CA flags are separate checks.
    pub fn is_signed_by(&self, issuer: &Certificate) -> bool {
        match (parse_der(&self.der), parse_der(&issuer.der)) {
            (Ok(cert), Ok(issuer)) => cert.verify_signature(Some(issuer.public_key())).is_ok(),
            _ => false,
        }
    }

    /// Whether this certificate's issuer name is byte-for-byte `issuer`'s subject name.
    pub fn is_issued_by_name(&self, issuer: &Certificate) -> bool {
        self.issuer_raw == issuer.subject_raw
    }

    /// The certificate as PEM (64-column lines, trailing newline).
    pub fn to_pem(&self) -> String {
        let body = STANDARD.encode(&self.der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        let mut rest = body.as_str();
        while !rest.is_empty() {
            let (line, tail) = rest.split_at(rest.len().min(64));
            pem.push_str(line);
            pem.push('\n');
            rest = tail;
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }
}

/// Parses one certificate given as PEM (`-----BEGIN CERTIFICATE-----`) or as bare base64 DER,
/// as Azure accepts in enrollments and CA uploads.
///
/// Whitespace anywhere is tolerated, and so are literal `\n` / `\r` escape sequences inside a
/// PEM body (a common result of double JSON escaping). Text around PEM blocks is ignored, but
/// every PEM block must be a `CERTIFICATE` and there must be exactly one.
/// Whether `leaf` chains to one of `anchors` through `intermediates` (DER, in any order): each
/// link's issuer name and signature checked, every certificate above the leaf a CA valid at
/// `now_unix`, at most `intermediates.len()` links. The leaf's own validity is the caller's.
/// A name-and-signature walk, for chains that path validation with EKU rules does not fit
/// (EK certificates) or that have already been matched to a device identity.
pub fn chains_to(
    leaf: &Certificate,
    intermediates: &[Vec<u8>],
    anchors: &[Certificate],
    now_unix: i64,
) -> bool {
    let chain: Vec<Certificate> = intermediates
        .iter()
        .filter_map(|der| Certificate::from_der(der).ok())
        .filter(|c| c.is_ca() && c.is_valid_at(now_unix))
        .collect();
    let links = |child: &Certificate, parent: &Certificate| {
        child.is_issued_by_name(parent) && child.is_signed_by(parent)
    };
    let mut current = leaf.clone();
    for _ in 0..=chain.len() {
        if anchors
            .iter()
            .any(|a| a.is_valid_at(now_unix) && links(&current, a))
        {
            return true;
        }
        match chain.iter().find(|c| links(&current, c)) {
            Some(next) => current = next.clone(),
            None => return false,
        }
    }
    false
}

pub fn parse_certificate(input: &str) -> Result<Certificate, X509Error> {
    let input = input.trim();
    if input.is_empty() {
        return Err(X509Error::Empty);
    }
    let der = if input.contains("-----BEGIN") {
        let mut blocks = pem_certificates(input)?;
        match blocks.len() {
            0 => return Err(X509Error::NotACertificate("no complete PEM block".into())),
            1 => blocks.remove(0),
            n => return Err(X509Error::MultipleCertificates(n)),
        }
    } else {
        decode_base64(input)?
    };
    Certificate::from_der(&der)
}

/// Checks a CA proof-of-possession (§5.6): `verification_cert` (PEM or base64 DER) must have
/// the subject CN `code` exactly, be signed by `ca`'s key and be valid at `now_unix`.
///
/// Checks run in that order, so a certificate with the wrong CN reports
/// [`PopError::CommonNameMismatch`] even if it is also expired. An empty `code` never matches.
pub fn verify_proof_of_possession(
    ca: &Certificate,
    verification_cert: &str,
    code: &str,
    now_unix: i64,
) -> Result<(), PopError> {
    let cert = parse_certificate(verification_cert)?;
    if code.is_empty() || cert.common_name() != Some(code) {
        return Err(PopError::CommonNameMismatch);
    }
    if !cert.is_signed_by(ca) {
        return Err(PopError::SignatureInvalid);
    }
    if now_unix < cert.not_before_unix() {
        return Err(PopError::NotYetValid);
    }
    if now_unix > cert.not_after_unix() {
        return Err(PopError::Expired);
    }
    Ok(())
}

fn parse_der(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(X509Error::NotACertificate(
            "trailing data after the certificate".into(),
        )),
        Err(e) => Err(X509Error::NotACertificate(e.to_string())),
    }
}

fn rfc3339(at: OffsetDateTime) -> Result<String, X509Error> {
    at.replace_nanosecond(0)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .ok_or_else(|| X509Error::NotACertificate("validity date out of range".into()))
}

/// Standard base64 with all whitespace (and literal `\n`, `\r` escapes) removed.
fn decode_base64(text: &str) -> Result<Vec<u8>, X509Error> {
    let compact: String = text
        .replace("\\n", "")
        .replace("\\r", "")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(compact).map_err(|_| X509Error::NotBase64)
}

/// DER of every PEM block in `input`; any block that is not a `CERTIFICATE` is an error.
/// Markers may sit anywhere (not only at line starts), so single-line PEM works too.
fn pem_certificates(input: &str) -> Result<Vec<Vec<u8>>, X509Error> {
    const BEGIN: &str = "-----BEGIN ";
    const DASHES: &str = "-----";
    let mut blocks = Vec::new();
    let mut rest = input;
    while let Some(start) = rest.find(BEGIN) {
        let after_begin = &rest[start + BEGIN.len()..];
        let label_len = after_begin
            .find(DASHES)
            .ok_or_else(|| X509Error::NotACertificate("unterminated PEM header".into()))?;
        let label = &after_begin[..label_len];
        let body_and_rest = &after_begin[label_len + DASHES.len()..];
        let end = format!("-----END {label}-----");
        let body_len = body_and_rest
            .find(&end)
            .ok_or_else(|| X509Error::NotACertificate("PEM block has no END line".into()))?;
        if label != "CERTIFICATE" {
            // The label is not echoed: it is caller-controlled text.
            return Err(X509Error::NotACertificate(
                "PEM block is not a CERTIFICATE".into(),
            ));
        }
        blocks.push(decode_base64(&body_and_rest[..body_len])?);
        rest = &body_and_rest[body_len + end.len()..];
    }
    Ok(blocks)
}

mod attestor;
pub use attestor::{
    ChainError, ClientCertificate, GroupCertificate, MAX_CHAIN_LEN, X509AttestationError,
    X509Attestor, X509Enrollment, X509Evidence, X509Group,
};

#[cfg(test)]
mod tests;
