//! The core of an OCSP responder (RFC 6960): parse a request, build a signed response.
//!
//! The caller (the service) owns the transport (`application/ocsp-request` over HTTP POST or
//! base64 in a GET path) and the certificate status store. The flow is:
//!
//! 1. [`OcspRequest::parse`] the DER body; a [`OcspRequestError`] means answer
//!    [`OcspFailure::MalformedRequest`].
//! 2. For each [`CertId`]: if [`CertId::matches_issuer`] our issuer, look its serial up
//!    ([`CertId::serial`], [`CertId::serial_hex`]); otherwise its status is
//!    [`CertStatus::Unknown`] (or answer [`OcspFailure::Unauthorized`] for the whole request).
//! 3. [`build_response`] with the [`OcspSigner`] of the issuing CA, echoing the request's
//!    nonce.
//!
//! The issuing CA signs its responses itself (no delegated responder certificate): the
//! responder ID is `byKey`, and the response carries the issuer certificate so that clients
//! such as `openssl ocsp` find the signer without extra configuration.
//!
//! Parsing never panics on any byte input; request signatures (`optionalSignature`) are not
//! checked, only reported through [`OcspRequest::signed`].

use std::fmt;

use rcgen::{KeyPair, PublicKeyData as _, SigningKey as _};
use ring::digest;
use yasna::Tag;
use yasna::models::ObjectIdentifier;

use crate::der::{self, Element, Malformed, Reader};
use crate::hierarchy::CaKey;
use crate::revocation::ReasonCode;
use crate::{CaHierarchy, Error, SecretPem, pem};

/// id-pkix-ocsp-nonce, 1.3.6.1.5.5.7.48.1.2.
const ID_PKIX_OCSP_NONCE: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 2];
/// id-pkix-ocsp-basic, 1.3.6.1.5.5.7.48.1.1.
const ID_PKIX_OCSP_BASIC: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 1];
const ID_SHA1: &[u64] = &[1, 3, 14, 3, 2, 26];
const ID_SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];
const ID_SHA384: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 2];
const ID_SHA512: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 3];

/// The most CertIDs one request may ask about; more is [`OcspRequestError::TooManyCertIds`].
pub const MAX_CERT_IDS: usize = 32;
/// The longest nonce extension value accepted (RFC 8954 allows 1–32 octets of nonce inside an
/// OCTET STRING; this leaves room for clients that send it raw).
pub const MAX_NONCE_LEN: usize = 64;

/// Why a request could not be parsed. Every variant maps to `malformedRequest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OcspRequestError {
    /// The DER does not have the OCSPRequest shape; `at` names the part that failed.
    #[error("malformed OCSP request ({at})")]
    Malformed {
        /// The ASN.1 element that failed, e.g. `"CertID"`.
        at: &'static str,
    },
    /// `tbsRequest.version` is not v1.
    #[error("unsupported OCSP request version {0}")]
    UnsupportedVersion(u8),
    /// The request lists no certificate.
    #[error("the OCSP request lists no certificate")]
    NoCertIds,
    /// The request lists more than [`MAX_CERT_IDS`] certificates.
    #[error("the OCSP request lists more than {MAX_CERT_IDS} certificates")]
    TooManyCertIds,
}

fn malformed(at: &'static str) -> impl Fn(Malformed) -> OcspRequestError {
    move |_| OcspRequestError::Malformed { at }
}

/// The hash algorithm of a [`CertId`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    /// SHA-1 (what `openssl ocsp` and most clients send by default).
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// Any other algorithm, by dotted OID; such a CertID never matches an issuer.
    Other(String),
}

impl HashAlgorithm {
    fn digest(&self) -> Option<&'static digest::Algorithm> {
        match self {
            HashAlgorithm::Sha1 => Some(&digest::SHA1_FOR_LEGACY_USE_ONLY),
            HashAlgorithm::Sha256 => Some(&digest::SHA256),
            HashAlgorithm::Sha384 => Some(&digest::SHA384),
            HashAlgorithm::Sha512 => Some(&digest::SHA512),
            HashAlgorithm::Other(_) => None,
        }
    }

    fn from_oid(content: &[u8]) -> HashAlgorithm {
        [
            (ID_SHA1, HashAlgorithm::Sha1),
            (ID_SHA256, HashAlgorithm::Sha256),
            (ID_SHA384, HashAlgorithm::Sha384),
            (ID_SHA512, HashAlgorithm::Sha512),
        ]
        .into_iter()
        .find(|(oid, _)| der::oid_content(oid) == content)
        .map(|(_, algorithm)| algorithm)
        .unwrap_or_else(|| HashAlgorithm::Other(der::oid_string(content)))
    }
}

/// One certificate a request asks about (RFC 6960 §4.1.1 `CertID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertId {
    /// The algorithm of the two hashes.
    pub hash_algorithm: HashAlgorithm,
    /// Hash of the issuer's subject name (DER).
    pub issuer_name_hash: Vec<u8>,
    /// Hash of the issuer's public key (the subjectPublicKey BIT STRING contents).
    pub issuer_key_hash: Vec<u8>,
    /// The INTEGER contents as received (two's complement; a leading `00` when the top bit
    /// of the magnitude is set).
    serial_der: Vec<u8>,
    /// The whole CertID as received; echoed verbatim in the response.
    raw: Vec<u8>,
}

impl CertId {
    /// The serial number's magnitude, big-endian, without a leading sign byte. Negative
    /// serials (invalid, but encodable) come back as their two's-complement bytes.
    pub fn serial(&self) -> &[u8] {
        match self.serial_der.as_slice() {
            [0x00, rest @ ..] if !rest.is_empty() => rest,
            all => all,
        }
    }

    /// The serial as upper-case hex, in the form of
    /// [`crate::IssuedDeviceCertificate::serial_hex`].
    pub fn serial_hex(&self) -> String {
        self.serial().iter().map(|b| format!("{b:02X}")).collect()
    }

    /// Whether this CertID names `issuer`: both hashes, computed with this CertID's
    /// algorithm, are equal. Always false for an unsupported hash algorithm.
    pub fn matches_issuer(&self, issuer: &IssuerInfo) -> bool {
        let Some(algorithm) = self.hash_algorithm.digest() else {
            return false;
        };
        digest::digest(algorithm, &issuer.name_der).as_ref() == self.issuer_name_hash.as_slice()
            && digest::digest(algorithm, &issuer.key_bits).as_ref()
                == self.issuer_key_hash.as_slice()
    }

    /// The CertID's DER as received.
    pub fn der(&self) -> &[u8] {
        &self.raw
    }

    fn parse(element: Element<'_>) -> Result<CertId, OcspRequestError> {
        let at = malformed("CertID");
        let mut fields = element.children();
        let algorithm = fields.sequence().map_err(&at)?;
        let mut algorithm_fields = algorithm.children();
        let oid = algorithm_fields.next().and_then(|e| e.oid()).map_err(&at)?;
        // Parameters: absent or NULL in practice; anything well-formed is tolerated.
        if !algorithm_fields.is_empty() {
            algorithm_fields.next().map_err(&at)?;
            algorithm_fields.finish().map_err(&at)?;
        }
        let issuer_name_hash = fields.next().and_then(|e| e.octet_string()).map_err(&at)?;
        let issuer_key_hash = fields.next().and_then(|e| e.octet_string()).map_err(&at)?;
        let serial = fields.next().and_then(|e| e.integer()).map_err(&at)?;
        fields.finish().map_err(&at)?;
        Ok(CertId {
            hash_algorithm: HashAlgorithm::from_oid(oid),
            issuer_name_hash: issuer_name_hash.to_vec(),
            issuer_key_hash: issuer_key_hash.to_vec(),
            serial_der: serial.to_vec(),
            raw: element.raw.to_vec(),
        })
    }
}

/// A parsed OCSP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcspRequest {
    /// The certificates asked about, in request order (1 to [`MAX_CERT_IDS`]).
    pub cert_ids: Vec<CertId>,
    /// The nonce extension's value (the extnValue contents, RFC 8954: itself a DER OCTET
    /// STRING), to be echoed byte for byte; `None` if the request has no nonce.
    pub nonce: Option<Vec<u8>>,
    /// Whether the request carries an `optionalSignature` (never verified here).
    pub signed: bool,
}

impl OcspRequest {
    /// Parses a DER `OCSPRequest`. Strict DER; nothing may follow it. Request extensions
    /// other than the nonce, per-request extensions and the requestor name are ignored.
    pub fn parse(der: &[u8]) -> Result<OcspRequest, OcspRequestError> {
        let request = Reader::single_sequence(der).map_err(malformed("OCSPRequest"))?;
        let mut top = request.children();
        let tbs = top.sequence().map_err(malformed("TBSRequest"))?;
        let signed = top
            .optional_context(0)
            .map_err(malformed("optionalSignature"))?
            .is_some();
        top.finish().map_err(malformed("OCSPRequest"))?;

        let mut fields = tbs.children();
        if let Some(version) = fields.optional_context(0).map_err(malformed("version"))? {
            let version = Reader::single(version.content)
                .and_then(|v| v.small_uint())
                .map_err(malformed("version"))?;
            if version != 0 {
                return Err(OcspRequestError::UnsupportedVersion(version));
            }
        }
        fields
            .optional_context(1)
            .map_err(malformed("requestorName"))?;
        let list = fields.sequence().map_err(malformed("requestList"))?;
        let extensions = fields
            .optional_context(2)
            .map_err(malformed("requestExtensions"))?;
        fields.finish().map_err(malformed("TBSRequest"))?;

        let mut cert_ids = Vec::new();
        let mut requests = list.children();
        while !requests.is_empty() {
            if cert_ids.len() == MAX_CERT_IDS {
                return Err(OcspRequestError::TooManyCertIds);
            }
            let request = requests.sequence().map_err(malformed("Request"))?;
            let mut request_fields = request.children();
            let cert_id = request_fields.sequence().map_err(malformed("CertID"))?;
            request_fields
                .optional_context(0)
                .map_err(malformed("singleRequestExtensions"))?;
            request_fields.finish().map_err(malformed("Request"))?;
            cert_ids.push(CertId::parse(cert_id)?);
        }
        if cert_ids.is_empty() {
            return Err(OcspRequestError::NoCertIds);
        }

        let nonce = match extensions {
            Some(tagged) => find_nonce(tagged)?,
            None => None,
        };
        Ok(OcspRequest {
            cert_ids,
            nonce,
            signed,
        })
    }
}

/// The nonce in `[2] EXPLICIT Extensions`, checking every extension's shape.
fn find_nonce(tagged: Element<'_>) -> Result<Option<Vec<u8>>, OcspRequestError> {
    let at = malformed("requestExtensions");
    let extensions = Reader::single_sequence(tagged.content).map_err(&at)?;
    let nonce_oid = der::oid_content(ID_PKIX_OCSP_NONCE);
    let mut nonce = None;
    let mut list = extensions.children();
    while !list.is_empty() {
        let extension = list.sequence().map_err(&at)?;
        let mut fields = extension.children();
        let oid = fields.next().and_then(|e| e.oid()).map_err(&at)?;
        let mut value = fields.next().map_err(&at)?;
        if value.boolean().is_ok() {
            value = fields.next().map_err(&at)?;
        }
        let value = value.octet_string().map_err(&at)?;
        fields.finish().map_err(&at)?;
        if oid == nonce_oid.as_slice() {
            if nonce.is_some() || value.is_empty() || value.len() > MAX_NONCE_LEN {
                return Err(OcspRequestError::Malformed { at: "nonce" });
            }
            nonce = Some(value.to_vec());
        }
    }
    Ok(nonce)
}

/// What identifies an issuer in a CertID: its subject name and public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerInfo {
    /// The issuer certificate's subject Name (DER).
    name_der: Vec<u8>,
    /// The issuer's subjectPublicKey BIT STRING contents (without the unused-bits octet).
    key_bits: Vec<u8>,
}

impl IssuerInfo {
    /// Reads the subject and key of an issuer certificate (DER).
    pub fn from_certificate_der(der: &[u8]) -> Result<IssuerInfo, Error> {
        let cert = pem::parse_der(der, "issuer certificate")?;
        Ok(IssuerInfo {
            name_der: cert.subject().as_raw().to_vec(),
            key_bits: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// A SHA-1 CertID for the certificate with this `serial` (magnitude bytes) issued by
    /// this issuer, as a client would build it. Useful for tests and for pre-computing
    /// responses.
    pub fn cert_id(&self, serial: &[u8]) -> CertId {
        let name_hash = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &self.name_der);
        let key_hash = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &self.key_bits);
        let raw = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_sequence(|w| {
                    w.next().write_oid(&ObjectIdentifier::from_slice(ID_SHA1));
                    w.next().write_null();
                });
                w.next().write_bytes(name_hash.as_ref());
                w.next().write_bytes(key_hash.as_ref());
                w.next().write_bigint_bytes(serial, true);
            })
        });
        let serial_der = match serial.iter().position(|b| *b != 0) {
            None => vec![0],
            Some(first) => {
                let magnitude = serial.get(first..).unwrap_or_default();
                let mut bytes = Vec::with_capacity(magnitude.len() + 1);
                if magnitude.first().is_some_and(|b| b & 0x80 != 0) {
                    bytes.push(0);
                }
                bytes.extend_from_slice(magnitude);
                bytes
            }
        };
        CertId {
            hash_algorithm: HashAlgorithm::Sha1,
            issuer_name_hash: name_hash.as_ref().to_vec(),
            issuer_key_hash: key_hash.as_ref().to_vec(),
            serial_der,
            raw,
        }
    }
}

/// The status of one certificate in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    /// Not revoked (it was issued by us and is not on the revocation list).
    Good,
    /// Revoked at this time, for this reason if known.
    Revoked {
        /// When, Unix seconds.
        revoked_at_unix: i64,
        /// `revocationReason`, written when present.
        reason: Option<ReasonCode>,
    },
    /// The responder does not know the certificate (not our issuer, or an unknown serial).
    Unknown,
}

/// A response that is not `successful` (RFC 6960 §4.2.1); these are not signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OcspFailure {
    /// `malformedRequest` (1): the request did not parse.
    MalformedRequest,
    /// `internalError` (2): the responder is in an inconsistent internal state.
    InternalError,
    /// `tryLater` (3): the responder cannot answer now (storage unavailable, say).
    TryLater,
    /// `sigRequired` (5): the responder requires signed requests.
    SigRequired,
    /// `unauthorized` (6): the responder may not answer for (one of) these certificates.
    Unauthorized,
}

impl OcspFailure {
    /// The `OCSPResponseStatus` value.
    pub fn code(self) -> u8 {
        match self {
            OcspFailure::MalformedRequest => 1,
            OcspFailure::InternalError => 2,
            OcspFailure::TryLater => 3,
            OcspFailure::SigRequired => 5,
            OcspFailure::Unauthorized => 6,
        }
    }

    /// The DER `OCSPResponse`: the status alone, no responseBytes.
    pub fn to_der(self) -> Vec<u8> {
        yasna::construct_der(|w| w.write_sequence(|w| w.next().write_enum(i64::from(self.code()))))
    }
}

/// Signs OCSP responses with an issuing CA's key.
pub struct OcspSigner {
    key: CaKey,
    algorithm_der: Vec<u8>,
    responder_key_hash: Vec<u8>,
    certificate_der: Vec<u8>,
    issuer: IssuerInfo,
}

impl fmt::Debug for OcspSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OcspSigner")
            .field("key", &"[redacted]")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl OcspSigner {
    /// A signer for the CA whose certificate is `issuer_cert_pem` (exactly one PEM
    /// certificate) and whose private key is `key`. The key must belong to the certificate
    /// and be of a type this crate signs with (see [`Error::UnsupportedSigningKey`]); the
    /// signature algorithm follows the key: ecdsa-with-SHA256 for the P-256 keys
    /// [`CaHierarchy::generate`] makes, sha256WithRSAEncryption for an imported RSA key.
    pub fn from_pem(issuer_cert_pem: &str, key: &SecretPem) -> Result<OcspSigner, Error> {
        let key = KeyPair::from_pem(key.expose()).map_err(|e| Error::InvalidPem {
            what: "issuer key",
            reason: e.to_string(),
        })?;
        Self::with_key(issuer_cert_pem, CaKey::Software(Box::new(key)))
    }

    fn with_key(issuer_cert_pem: &str, key: CaKey) -> Result<OcspSigner, Error> {
        let certificate_der = pem::single_certificate(issuer_cert_pem, "issuer certificate")?;
        let cert = pem::parse_der(&certificate_der, "issuer certificate")?;
        if key.subject_public_key_info() != cert.public_key().raw {
            return Err(Error::KeyMismatch { what: "issuer" });
        }
        let algorithm_der =
            der::signature_algorithm_der(key.algorithm()).ok_or(Error::UnsupportedSigningKey)?;
        let issuer = IssuerInfo::from_certificate_der(&certificate_der)?;
        let responder_key_hash =
            digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &issuer.key_bits)
                .as_ref()
                .to_vec();
        Ok(OcspSigner {
            key,
            algorithm_der,
            responder_key_hash,
            certificate_der,
            issuer,
        })
    }

    /// The issuer this signer answers for (for [`CertId::matches_issuer`]).
    pub fn issuer(&self) -> &IssuerInfo {
        &self.issuer
    }
}

impl CaHierarchy {
    /// The OCSP signer for certificates issued by the intermediate (every device and server
    /// certificate). With the intermediate key in a PKCS#11 token, responses are signed in
    /// the token.
    pub fn ocsp_signer(&self) -> Result<OcspSigner, Error> {
        if let Some(key) = self.token_key() {
            return OcspSigner::with_key(self.intermediate_cert_pem(), CaKey::Token(key.clone()));
        }
        OcspSigner::from_pem(self.intermediate_cert_pem(), self.intermediate_key_pem())
    }
}

/// Builds a signed, `successful` DER `OCSPResponse` with one SingleResponse per entry of
/// `responses`, in order.
///
/// `ResponseData`: version v1 (omitted), responderID `byKey` (SHA-1 of the signer's public
/// key), `producedAt` = `produced_at_unix`; each SingleResponse echoes the CertID as
/// received, with its status, `thisUpdate` = `produced_at_unix` (the status is read live at
/// that moment) and `nextUpdate` if given. `nonce` (from [`OcspRequest::nonce`]) is echoed in
/// `responseExtensions`. The BasicOCSPResponse is signed with the signer's key and carries
/// the signer's certificate. Fails on times outside years 0–9999 ([`Error::InvalidTime`]),
/// `next_update_unix` before `produced_at_unix`, or a signing failure.
pub fn build_response(
    signer: &OcspSigner,
    responses: &[(CertId, CertStatus)],
    nonce: Option<&[u8]>,
    produced_at_unix: i64,
    next_update_unix: Option<i64>,
) -> Result<Vec<u8>, Error> {
    let time = |unix: i64| der::generalized_time(unix).ok_or(Error::InvalidTime(unix));
    let produced_at = time(produced_at_unix)?;
    let next_update = next_update_unix.map(time).transpose()?;
    if next_update_unix.is_some_and(|next| next < produced_at_unix) {
        return Err(Error::InvalidTime(next_update_unix.unwrap_or_default()));
    }
    let revocation_times = responses
        .iter()
        .map(|(_, status)| match status {
            CertStatus::Revoked {
                revoked_at_unix, ..
            } => time(*revoked_at_unix).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>, Error>>()?;

    let tbs = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_tagged(Tag::context(2), |w| {
                w.write_bytes(&signer.responder_key_hash)
            });
            w.next().write_generalized_time(&produced_at);
            w.next().write_sequence(|w| {
                for ((cert_id, status), revoked_at) in responses.iter().zip(&revocation_times) {
                    w.next().write_sequence(|w| {
                        w.next().write_der(cert_id.der());
                        match (status, revoked_at) {
                            (CertStatus::Revoked { reason, .. }, Some(revoked_at)) => {
                                w.next().write_tagged_implicit(Tag::context(1), |w| {
                                    w.write_sequence(|w| {
                                        w.next().write_generalized_time(revoked_at);
                                        if let Some(reason) = reason {
                                            w.next().write_tagged(Tag::context(0), |w| {
                                                w.write_enum(i64::from(reason.code()))
                                            });
                                        }
                                    })
                                });
                            }
                            (CertStatus::Good, _) => {
                                w.next()
                                    .write_tagged_implicit(Tag::context(0), |w| w.write_null());
                            }
                            // `Unknown`; a `Revoked` always has its time (computed above).
                            _ => {
                                w.next()
                                    .write_tagged_implicit(Tag::context(2), |w| w.write_null());
                            }
                        }
                        w.next().write_generalized_time(&produced_at);
                        if let Some(next_update) = &next_update {
                            w.next().write_tagged(Tag::context(0), |w| {
                                w.write_generalized_time(next_update)
                            });
                        }
                    });
                }
            });
            if let Some(nonce) = nonce {
                w.next().write_tagged(Tag::context(1), |w| {
                    w.write_sequence(|w| {
                        w.next().write_sequence(|w| {
                            w.next()
                                .write_oid(&ObjectIdentifier::from_slice(ID_PKIX_OCSP_NONCE));
                            w.next().write_bytes(nonce);
                        })
                    })
                });
            }
        })
    });
    let signature = signer
        .key
        .sign(&tbs)
        .map_err(|e| Error::Generation(e.to_string()))?;
    let basic = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(&tbs);
            w.next().write_der(&signer.algorithm_der);
            w.next().write_bitvec_bytes(&signature, signature.len() * 8);
            w.next().write_tagged(Tag::context(0), |w| {
                w.write_sequence(|w| w.next().write_der(&signer.certificate_der))
            });
        })
    });
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_enum(0);
            w.next().write_tagged(Tag::context(0), |w| {
                w.write_sequence(|w| {
                    w.next()
                        .write_oid(&ObjectIdentifier::from_slice(ID_PKIX_OCSP_BASIC));
                    w.next().write_bytes(&basic);
                })
            });
        })
    }))
}

#[cfg(test)]
mod tests;
