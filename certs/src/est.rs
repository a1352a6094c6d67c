//! The body encodings of EST (RFC 7030): certs-only PKCS#7 out, PKCS#10 in, CSR attributes.
//!
//! EST bodies are base64 (RFC 7030 §4: `Content-Transfer-Encoding: base64`). The service
//! sets the content types: `application/pkcs7-mime; smime-type=certs-only` for
//! [`certs_only_body`] (`/cacerts`, `/simpleenroll`, `/simplereenroll`) and
//! `application/csrattrs` for [`csrattrs_body`].

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer as _;
use yasna::Tag;
use yasna::models::ObjectIdentifier;

/// id-signedData, 1.2.840.113549.1.7.2.
const ID_SIGNED_DATA: &[u64] = &[1, 2, 840, 113549, 1, 7, 2];
/// id-data, 1.2.840.113549.1.7.1.
const ID_DATA: &[u64] = &[1, 2, 840, 113549, 1, 7, 1];

/// Why an EST request body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EstError {
    /// The body is empty (or only whitespace).
    #[error("the request body is empty")]
    Empty,
    /// The body is neither base64 nor a PEM block.
    #[error("the request body is not base64")]
    NotBase64,
    /// A PEM body has no `CERTIFICATE REQUEST` block.
    #[error("the PEM body has no CERTIFICATE REQUEST block")]
    NoCsrBlock,
    /// The decoded bytes are not one DER PKCS#10 request.
    #[error("the request body is not a PKCS#10 CSR: {reason}")]
    NotACsr {
        /// The parser's message.
        reason: String,
    },
}

/// A "certs-only" degenerate PKCS#7 / CMS SignedData (RFC 5652; RFC 7030 §4.1.3) holding
/// `certificates` (DER), in the given order: version 1, no digest algorithms, encapsulated
/// content type id-data without content, no signers.
///
/// The certificates are written in the caller's order (leaf first, say) rather than sorted as
/// strict DER wants for a SET OF: clients read it either way, and some take the first
/// certificate as the issued one.
pub fn certs_only_pkcs7<C: AsRef<[u8]>>(certificates: &[C]) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next()
                .write_oid(&ObjectIdentifier::from_slice(ID_SIGNED_DATA));
            w.next().write_tagged(Tag::context(0), |w| {
                w.write_sequence(|w| {
                    w.next().write_u8(1);
                    w.next().write_set(|_| {});
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&ObjectIdentifier::from_slice(ID_DATA));
                    });
                    // certificates [0] IMPLICIT CertificateSet
                    w.next().write_tagged_implicit(Tag::context(0), |w| {
                        w.write_sequence(|w| {
                            for certificate in certificates {
                                w.next().write_der(certificate.as_ref());
                            }
                        })
                    });
                    w.next().write_set(|_| {});
                })
            });
        })
    })
}

/// [`certs_only_pkcs7`] as an EST body: base64, 64 characters per line, CRLF line ends.
pub fn certs_only_body<C: AsRef<[u8]>>(certificates: &[C]) -> String {
    base64_lines(&certs_only_pkcs7(certificates))
}

/// Decodes the body of an EST `/simpleenroll` or `/simplereenroll` request into CSR DER.
///
/// Accepts base64 with any ASCII whitespace (CRLF line breaks included) and with or without
/// padding, or a PEM `CERTIFICATE REQUEST` (or `NEW CERTIFICATE REQUEST`) block. Checks that
/// the result is exactly one DER PKCS#10 request; the signature and subject are checked when
/// signing ([`crate::CaHierarchy::sign_device_csr_with`]).
pub fn decode_csr_body(body: &[u8]) -> Result<Vec<u8>, EstError> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Err(EstError::Empty);
    }
    let der = if trimmed.starts_with(b"-----BEGIN") {
        Pem::iter_from_buffer(trimmed)
            .map_while(Result::ok)
            .find(|block| {
                block.label == "CERTIFICATE REQUEST" || block.label == "NEW CERTIFICATE REQUEST"
            })
            .map(|block| block.contents)
            .ok_or(EstError::NoCsrBlock)?
    } else {
        let compact: Vec<u8> = trimmed
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        LENIENT_PADDING
            .decode(&compact)
            .map_err(|_| EstError::NotBase64)?
    };
    match X509CertificationRequest::from_der(&der) {
        Ok(([], _)) => Ok(der),
        Ok(_) => Err(EstError::NotACsr {
            reason: "trailing data after the CSR".into(),
        }),
        Err(e) => Err(EstError::NotACsr {
            reason: e.to_string(),
        }),
    }
}

/// Standard base64 that accepts input with or without `=` padding.
const LENIENT_PADDING: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One entry of the `/csrattrs` answer (RFC 7030 §4.5.2 `AttrOrOID`, the OID form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsrAttribute {
    /// challengePassword, 1.2.840.113549.1.9.7: the client should include one.
    ChallengePassword,
    /// extensionRequest, 1.2.840.113549.1.9.14: the client may request extensions.
    ExtensionRequest,
    /// ecdsa-with-SHA256, 1.2.840.10045.4.3.2: the client should sign the CSR with it.
    EcdsaWithSha256,
    /// Any other OID, by components.
    Oid(Vec<u64>),
}

impl CsrAttribute {
    fn components(&self) -> &[u64] {
        match self {
            CsrAttribute::ChallengePassword => &[1, 2, 840, 113549, 1, 9, 7],
            CsrAttribute::ExtensionRequest => &[1, 2, 840, 113549, 1, 9, 14],
            CsrAttribute::EcdsaWithSha256 => &[1, 2, 840, 10045, 4, 3, 2],
            CsrAttribute::Oid(components) => components,
        }
    }
}

/// What Zerotouch asks of EST clients by default: nothing. Devices authenticate with TLS
/// client certificates (not a challengePassword), and the device profile ignores requested
/// extensions, so the service answers `/csrattrs` with `204 No Content` while this list is
/// empty and with [`csrattrs_body`] of its configured list otherwise.
pub const DEFAULT_CSR_ATTRIBUTES: &[CsrAttribute] = &[];

/// The DER `CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID` for `attributes`, each in the
/// OID form. An OID with fewer than two components or an invalid first arc is skipped.
pub fn csrattrs_der(attributes: &[CsrAttribute]) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for attribute in attributes {
                let components = attribute.components();
                if let [first, second, ..] = components
                    && *first <= 2
                    && (*first == 2 || *second < 40)
                {
                    w.next()
                        .write_oid(&ObjectIdentifier::from_slice(components));
                }
            }
        })
    })
}

/// [`csrattrs_der`] as an EST body: base64, 64 characters per line, CRLF line ends.
pub fn csrattrs_body(attributes: &[CsrAttribute]) -> String {
    base64_lines(&csrattrs_der(attributes))
}

fn base64_lines(der: &[u8]) -> String {
    let encoded = STANDARD.encode(der);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 32 + 2);
    // Base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests;
