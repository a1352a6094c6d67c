//! TPM attestation building blocks: parsing the `TPM2B_PUBLIC` areas a device sends as
//! `endorsementKey` and `storageRootKey` (§3.4), TPM object names, and the default TPM
//! registration id, and ([`activation`]) the activation blob the server sends as the
//! challenge.
//!
//! Only RSA keys are supported. DPS accepts RSA-2048 endorsement keys only and the activation
//! blob construction (§3.4) encrypts to RSA keys with RSA-OAEP, so an ECC (`0x0023`) or any
//! other public area is rejected with [`TpmError::UnsupportedType`] instead of being half
//! parsed.
//!
//! All integers are big-endian. Every length is checked against the bytes actually present,
//! and bytes left over after the declared size or after the structure are errors.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest;

use crate::symmetric_key::{self, SasError, SasToken};
use crate::{AttestedIdentity, Attestor, EnrollmentRef, Mechanism};

pub mod activation;
pub mod ek_certificate;

pub use activation::{
    Activation, ActivationError, ActivationRandomness, build_activation, build_activation_with,
};

/// `TPM_ALG_RSA`.
pub const ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_SHA1`.
pub const ALG_SHA1: u16 = 0x0004;
/// `TPM_ALG_AES`.
pub const ALG_AES: u16 = 0x0006;
/// `TPM_ALG_KEYEDHASH`.
pub const ALG_KEYEDHASH: u16 = 0x0008;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000B;
/// `TPM_ALG_SHA384`.
pub const ALG_SHA384: u16 = 0x000C;
/// `TPM_ALG_NULL`.
pub const ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_SM4`.
pub const ALG_SM4: u16 = 0x0013;
/// `TPM_ALG_RSASSA`.
pub const ALG_RSASSA: u16 = 0x0014;
/// `TPM_ALG_RSAES`.
pub const ALG_RSAES: u16 = 0x0015;
/// `TPM_ALG_RSAPSS`.
pub const ALG_RSAPSS: u16 = 0x0016;
/// `TPM_ALG_OAEP`.
pub const ALG_OAEP: u16 = 0x0017;
/// `TPM_ALG_ECC`.
pub const ALG_ECC: u16 = 0x0023;
/// `TPM_ALG_CAMELLIA`.
pub const ALG_CAMELLIA: u16 = 0x0026;
/// `TPM_ALG_CFB`.
pub const ALG_CFB: u16 = 0x0043;

/// The RSA exponent a TPM means when it stores 0.
const DEFAULT_EXPONENT: u32 = 65_537;
/// RSA key sizes a TPM can have.
const RSA_KEY_BITS: [u16; 4] = [1024, 2048, 3072, 4096];

/// Why a TPM public area was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The input is not standard base64.
    #[error("TPM public key is not valid base64")]
    NotBase64,
    /// A field runs past the end of the data.
    #[error("TPM public area is truncated in {what}")]
    Truncated {
        /// The field that was cut off.
        what: &'static str,
    },
    /// The declared size does not match: fewer bytes follow the `TPM2B_PUBLIC` size than it
    /// declares, or the `TPMT_PUBLIC` structure ends before the declared size.
    #[error("TPM public area declares {declared} bytes but has {actual}")]
    SizeMismatch {
        /// Size from the `TPM2B_PUBLIC` header.
        declared: usize,
        /// Bytes present (or bytes the structure used).
        actual: usize,
    },
    /// Bytes follow the declared `TPM2B_PUBLIC`.
    #[error("{count} unexpected bytes after the TPM public area")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The key type is not RSA.
    #[error("unsupported TPM key type {0:#06x}")]
    UnsupportedType(u16),
    /// The name algorithm is not SHA-1, SHA-256 or SHA-384 (or, for endorsement and storage
    /// root keys, not SHA-256).
    #[error("unsupported TPM name algorithm {0:#06x}")]
    UnsupportedNameAlg(u16),
    /// The RSA key size is not one a TPM uses (or, for endorsement and storage root keys,
    /// not 2048).
    #[error("unsupported RSA key size {0}")]
    UnsupportedKeySize(u16),
    /// The symmetric algorithm of the key is not one a storage key can have (AES, SM4,
    /// Camellia or NULL), or, for endorsement and storage root keys, not AES-128-CFB.
    #[error("unsupported TPM symmetric algorithm {0:#06x}")]
    UnsupportedSymmetric(u16),
    /// The RSA scheme is not NULL, RSAES, RSASSA, RSAPSS or OAEP.
    #[error("unsupported TPM RSA scheme {0:#06x}")]
    UnsupportedScheme(u16),
    /// The modulus length does not match the declared key size.
    #[error("RSA modulus is {actual} bytes, expected {expected}")]
    ModulusLength {
        /// `keyBits / 8`.
        expected: usize,
        /// Length of `unique`.
        actual: usize,
    },
}

/// The key algorithm and its public parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TpmKeyType {
    /// An RSA key; `exponent` is already normalised (a stored 0 reads as 65537).
    Rsa {
        /// `keyBits`.
        bits: u16,
        /// The public exponent.
        exponent: u32,
    },
}

/// `TPMT_SYM_DEF_OBJECT` when its algorithm is not NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymmetricDefinition {
    /// `TPM_ALG_AES`, `TPM_ALG_SM4` or `TPM_ALG_CAMELLIA`.
    pub algorithm: u16,
    /// Key size in bits.
    pub key_bits: u16,
    /// Block cipher mode, e.g. `TPM_ALG_CFB`.
    pub mode: u16,
}

/// `TPMT_RSA_SCHEME` when its algorithm is not NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemeDefinition {
    /// The scheme algorithm, e.g. `TPM_ALG_RSASSA`.
    pub algorithm: u16,
    /// The scheme's hash; `None` for RSAES, which has none.
    pub hash_alg: Option<u16>,
}

/// A parsed `TPM2B_PUBLIC` holding an RSA key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    /// Key algorithm and parameters.
    pub key_type: TpmKeyType,
    /// `nameAlg`.
    pub name_alg: u16,
    /// `objectAttributes` (TPMA_OBJECT bits).
    pub attributes: u32,
    /// `authPolicy` digest (empty if none).
    pub auth_policy: Vec<u8>,
    /// Symmetric definition for storage keys; `None` for TPM_ALG_NULL.
    pub symmetric: Option<SymmetricDefinition>,
    /// RSA scheme; `None` for TPM_ALG_NULL.
    pub scheme: Option<SchemeDefinition>,
    /// The RSA modulus (`unique`), big-endian.
    pub modulus: Vec<u8>,
    /// TPM name: `nameAlg` (u16) followed by the `nameAlg` digest of the `TPMT_PUBLIC` bytes.
    pub name: Vec<u8>,
    raw: Vec<u8>,
}

impl TpmPublic {
    /// Whether both describe the same RSA key (type, size, exponent and modulus), whatever
    /// their attributes, policy or encoding. This is how enrollments compare EKs.
    pub fn same_key(&self, other: &TpmPublic) -> bool {
        self.key_type == other.key_type && self.modulus == other.modulus
    }

    /// The default registration id the Azure C SDK derives for a TPM device: lower-case
    /// RFC 4648 base32 without padding of SHA-256 over the `TPM2B_PUBLIC` bytes exactly as
    /// received (size prefix included). Users may override it. Issue 6 may revise which bytes
    /// are hashed once it is checked against a real device.
    pub fn registration_id(&self) -> String {
        base32_lower(digest::digest(&digest::SHA256, &self.raw).as_ref())
    }

    /// The `TPM2B_PUBLIC` bytes as received (size prefix included).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The `TPMT_PUBLIC` bytes (without the size prefix): what the name is computed over.
    pub fn public_area(&self) -> &[u8] {
        self.raw.get(2..).unwrap_or_default()
    }

    /// The RSA public exponent (65537 when the TPM stores 0).
    pub fn exponent(&self) -> u32 {
        match self.key_type {
            TpmKeyType::Rsa { exponent, .. } => exponent,
        }
    }

    /// Checks what the activation blob construction relies on: RSA-2048, nameAlg SHA-256
    /// and AES-128-CFB as the symmetric definition.
    fn check_wrapping_profile(&self) -> Result<(), TpmError> {
        let TpmKeyType::Rsa { bits, .. } = self.key_type;
        if bits != 2048 {
            return Err(TpmError::UnsupportedKeySize(bits));
        }
        if self.name_alg != ALG_SHA256 {
            return Err(TpmError::UnsupportedNameAlg(self.name_alg));
        }
        match self.symmetric {
            Some(SymmetricDefinition {
                algorithm: ALG_AES,
                key_bits: 128,
                mode: ALG_CFB,
            }) => Ok(()),
            Some(SymmetricDefinition { algorithm, .. }) => {
                Err(TpmError::UnsupportedSymmetric(algorithm))
            }
            None => Err(TpmError::UnsupportedSymmetric(ALG_NULL)),
        }
    }
}

/// Parses a base64 (standard alphabet, padded) `TPM2B_PUBLIC`; surrounding whitespace is
/// ignored.
pub fn parse_public_b64(b64: &str) -> Result<TpmPublic, TpmError> {
    let bytes = STANDARD
        .decode(b64.trim())
        .map_err(|_| TpmError::NotBase64)?;
    parse_public(&bytes)
}

/// Parses a `TPM2B_PUBLIC`: a u16 size followed by exactly that many bytes of `TPMT_PUBLIC`.
pub fn parse_public(bytes: &[u8]) -> Result<TpmPublic, TpmError> {
    let mut outer = Reader::new(bytes);
    let declared = usize::from(outer.u16("size")?);
    let actual = outer.remaining();
    if actual < declared {
        return Err(TpmError::SizeMismatch { declared, actual });
    }
    if actual > declared {
        return Err(TpmError::TrailingBytes {
            count: actual - declared,
        });
    }
    let area = outer.bytes(declared, "public area")?;

    let mut r = Reader::new(area);
    let key_type = r.u16("type")?;
    if key_type != ALG_RSA {
        return Err(TpmError::UnsupportedType(key_type));
    }
    let name_alg = r.u16("nameAlg")?;
    let name_digest: &'static digest::Algorithm = match name_alg {
        ALG_SHA1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        ALG_SHA256 => &digest::SHA256,
        ALG_SHA384 => &digest::SHA384,
        other => return Err(TpmError::UnsupportedNameAlg(other)),
    };
    let attributes = r.u32("objectAttributes")?;
    let auth_policy = r.tpm2b("authPolicy")?.to_vec();

    let symmetric = match r.u16("symmetric.algorithm")? {
        ALG_NULL => None,
        algorithm @ (ALG_AES | ALG_SM4 | ALG_CAMELLIA) => Some(SymmetricDefinition {
            algorithm,
            key_bits: r.u16("symmetric.keyBits")?,
            mode: r.u16("symmetric.mode")?,
        }),
        other => return Err(TpmError::UnsupportedSymmetric(other)),
    };
    let scheme = match r.u16("scheme.scheme")? {
        ALG_NULL => None,
        ALG_RSAES => Some(SchemeDefinition {
            algorithm: ALG_RSAES,
            hash_alg: None,
        }),
        algorithm @ (ALG_RSASSA | ALG_RSAPSS | ALG_OAEP) => Some(SchemeDefinition {
            algorithm,
            hash_alg: Some(r.u16("scheme.hashAlg")?),
        }),
        other => return Err(TpmError::UnsupportedScheme(other)),
    };
    let bits = r.u16("keyBits")?;
    if !RSA_KEY_BITS.contains(&bits) {
        return Err(TpmError::UnsupportedKeySize(bits));
    }
    let exponent = match r.u32("exponent")? {
        0 => DEFAULT_EXPONENT,
        e => e,
    };
    let modulus = r.tpm2b("unique")?.to_vec();
    let expected = usize::from(bits / 8);
    if modulus.len() != expected {
        return Err(TpmError::ModulusLength {
            expected,
            actual: modulus.len(),
        });
    }
    if r.remaining() != 0 {
        return Err(TpmError::SizeMismatch {
            declared,
            actual: declared - r.remaining(),
        });
    }

    let mut name = name_alg.to_be_bytes().to_vec();
    name.extend_from_slice(digest::digest(name_digest, area).as_ref());
    Ok(TpmPublic {
        key_type: TpmKeyType::Rsa { bits, exponent },
        name_alg,
        attributes,
        auth_policy,
        symmetric,
        scheme,
        modulus,
        name,
        raw: bytes.to_vec(),
    })
}

/// Parses an endorsement key (`endorsementKey`, base64) and checks it is what DPS supports
/// and the activation blob needs: RSA-2048, nameAlg SHA-256, AES-128-CFB.
pub fn parse_endorsement_key(b64: &str) -> Result<TpmPublic, TpmError> {
    let key = parse_public_b64(b64)?;
    key.check_wrapping_profile()?;
    Ok(key)
}

/// Parses a storage root key (`storageRootKey`, base64) with the same requirements as
/// [`parse_endorsement_key`]: the HMAC key is imported under it with AES-128-CFB.
pub fn parse_storage_root_key(b64: &str) -> Result<TpmPublic, TpmError> {
    parse_endorsement_key(b64)
}

/// The TPM individual enrollment whose registration id the device claims (DPS has no TPM
/// groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmEnrollment {
    /// The enrolled endorsement key.
    pub endorsement_key: TpmPublic,
    /// `provisioningStatus == "enabled"`.
    pub enabled: bool,
}

/// What a TPM device presents: its endorsement key on every request, and from the second
/// request on a SAS token signed inside the TPM with the key from the activation blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmEvidence {
    /// The registration id from the URL.
    pub registration_id: String,
    /// `tpm.endorsementKey`, parsed with [`parse_endorsement_key`].
    pub endorsement_key: TpmPublic,
    /// The `Authorization` header, absent on the first request.
    pub token: Option<SasToken>,
}

/// TPM attestation (§3.4): the second half of the challenge, checking the SAS token the device
/// signed with the key it could only unwrap with its EK and SRK.
///
/// The first half, building the activation blob, is the service's; this attestor tells it when
/// a challenge is due ([`TpmAttestationError::ChallengeRequired`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmAttestor {
    /// This instance's ID scope; the token's resource must name it.
    pub id_scope: String,
    /// The TPM enrollment with the claimed registration id, if any.
    pub enrollment: Option<TpmEnrollment>,
    /// The HMAC key (standard base64) wrapped in the last activation blob sent to this
    /// registration, if one was sent.
    pub authentication_key: Option<String>,
}

/// Why TPM attestation refused a device (or asks it to take a challenge first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TpmAttestationError {
    /// There is no TPM enrollment with this registration id.
    #[error("no TPM enrollment for this registration id")]
    NotEnrolled,
    /// The presented endorsement key is not the enrolled one.
    #[error("the endorsement key does not match the enrollment")]
    EndorsementKeyMismatch,
    /// The endorsement key matches but there is no token yet, or no key was issued to check it
    /// against: answer with a fresh activation blob (401 with `authenticationKey`).
    #[error("the device must answer an activation challenge first")]
    ChallengeRequired,
    /// The token's decoded `sr` is not `{idScope}/registrations/{registrationId}`.
    #[error("the SAS token is not for this registration")]
    WrongResource,
    /// `skn` is present with a value other than empty or `registration`.
    #[error("the SAS token's key name is not accepted")]
    KeyName,
    /// The token is syntactically broken (its `sig` is not base64).
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// The token is authentic but has expired.
    #[error("the SAS token has expired")]
    Expired,
    /// The token was not signed with the issued key.
    #[error("the SAS token was not signed with the issued key")]
    Unauthorized,
    /// The token is authentic but the enrollment is disabled.
    #[error("the enrollment is disabled")]
    Disabled,
}

impl Attestor for TpmAttestor {
    type Evidence = TpmEvidence;
    type Error = TpmAttestationError;

    /// Checks, in order: an enrollment exists; its EK is the presented one
    /// ([`TpmPublic::same_key`]); a token is present; it is for this scope and registration and
    /// its `skn` is acceptable; a key was issued; the token verifies with it and has not
    /// expired; the enrollment is enabled.
    fn attest(
        &self,
        evidence: &TpmEvidence,
        now_unix: u64,
    ) -> Result<AttestedIdentity, TpmAttestationError> {
        let enrollment = self
            .enrollment
            .as_ref()
            .ok_or(TpmAttestationError::NotEnrolled)?;
        if !enrollment
            .endorsement_key
            .same_key(&evidence.endorsement_key)
        {
            return Err(TpmAttestationError::EndorsementKeyMismatch);
        }
        let token = evidence
            .token
            .as_ref()
            .ok_or(TpmAttestationError::ChallengeRequired)?;
        if !token.is_for_registration(&self.id_scope, &evidence.registration_id) {
            return Err(TpmAttestationError::WrongResource);
        }
        if !token.key_name_is_acceptable() {
            return Err(TpmAttestationError::KeyName);
        }
        let key = self
            .authentication_key
            .as_deref()
            .ok_or(TpmAttestationError::ChallengeRequired)?;
        match symmetric_key::verify(token, &[key], now_unix) {
            Ok(_) => {}
            Err(SasError::Expired) => return Err(TpmAttestationError::Expired),
            Err(SasError::Malformed(m)) => return Err(TpmAttestationError::Malformed(m)),
            Err(_) => return Err(TpmAttestationError::Unauthorized),
        }
        if !enrollment.enabled {
            return Err(TpmAttestationError::Disabled);
        }
        Ok(AttestedIdentity {
            registration_id: evidence.registration_id.clone(),
            mechanism: Mechanism::Tpm,
            matched: EnrollmentRef::Individual(evidence.registration_id.clone()),
            certificate_info: None,
            signing_certificate_info: None,
            expires_at: Some(token.se),
        })
    }
}

/// A bounds-checked big-endian cursor.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn remaining(&self) -> usize {
        self.data.len()
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], TpmError> {
        if len > self.data.len() {
            return Err(TpmError::Truncated { what });
        }
        let (head, tail) = self.data.split_at(len);
        self.data = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TpmError> {
        let bytes = self.bytes(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| TpmError::Truncated { what })
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TpmError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, TpmError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// A `TPM2B`: u16 length, then that many bytes.
    fn tpm2b(&mut self, what: &'static str) -> Result<&'a [u8], TpmError> {
        let len = usize::from(self.u16(what)?);
        self.bytes(len, what)
    }
}

/// RFC 4648 base32, lower-case alphabet, no padding.
fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buffer: u16 = 0;
    let mut bits: u32 = 0;
    for &byte in data {
        buffer = (buffer << 8) | u16::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[usize::from((buffer >> bits) & 0x1f)]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(
            ALPHABET[usize::from((buffer << (5 - bits)) & 0x1f)],
        ));
    }
    out
}

#[cfg(test)]
mod tests;
