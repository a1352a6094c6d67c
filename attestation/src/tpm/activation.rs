//! The TPM activation blob: what DPS sends a TPM device as `authenticationKey` (§3.4).
//!
//! The blob carries a fresh HMAC key that only the TPM holding the device's endorsement key
//! (EK) and storage root key (SRK) can unwrap:
//!
//! 1. A credential (`TPM2_MakeCredential` done in software) bound to the SRK's name and
//!    protected by a seed encrypted to the EK. `TPM2_ActivateCredential(activate = SRK,
//!    key = EK)` recovers it: a 16-byte AES key, `inner`.
//! 2. A duplication blob (`TPM2_Duplicate` done in software) of a KEYEDHASH (HMAC-SHA256)
//!    object whose sensitive part is wrapped twice: the inner wrapper with `inner`, the outer
//!    wrapper with a seed encrypted to the SRK. `TPM2_Import` under the SRK, with `inner` as
//!    the inner wrapper key, turns it into a loadable object.
//!
//! The device then signs its SAS tokens with `TPM2_HMAC` and the server verifies them with
//! [`Activation::hmac_key`].
//!
//! Layout (all integers big-endian, `T2B(x) = u16(len x) ‖ x`), for RSA-2048 keys:
//!
//! | # | Structure | Size |
//! |---|---|---|
//! | 1 | `TPM2B_ID_OBJECT` | 2 + 52 |
//! | 2 | `TPM2B_ENCRYPTED_SECRET` (credential seed, OAEP to the EK) | 2 + 256 |
//! | 3 | `TPM2B_PRIVATE` (duplicate) | 2 + 142 |
//! | 4 | `TPM2B_ENCRYPTED_SECRET` (import seed, OAEP to the SRK) | 2 + 256 |
//! | 5 | `TPM2B_PUBLIC` (the HMAC key) | 2 + 48 |
//! | 6 | `u16(0)`: no trailing data | 2 |
//!
//! Pure: no I/O. Randomness comes from openssl's CSPRNG in [`build_activation`], or is given
//! in [`build_activation_with`].

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use openssl::bn::BigNum;
use openssl::encrypt::Encrypter;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::{Padding, Rsa};
use openssl::symm::{self, Cipher};
use ring::{digest, hmac};

use super::{
    ALG_AES, ALG_CFB, ALG_KEYEDHASH, ALG_SHA256, SymmetricDefinition, TpmKeyType, TpmPublic,
};

/// `TPMA_OBJECT` of the HMAC key: `userWithAuth | noDA | sign` (bits 6, 10, 18). No
/// `fixedTPM`/`fixedParent`: it is an imported object.
pub const HMAC_KEY_ATTRIBUTES: u32 = 0x0004_0440;
/// `TPM_ALG_HMAC`, the keyed-hash scheme of the HMAC key.
const ALG_HMAC: u16 = 0x0005;
/// OAEP label of the credential seed (`TPM2_MakeCredential`), terminating NUL included.
const LABEL_IDENTITY: &[u8] = b"IDENTITY\0";
/// OAEP label of the import seed (`TPM2_Duplicate`), terminating NUL included.
const LABEL_DUPLICATE: &[u8] = b"DUPLICATE\0";
/// KDFa label of the symmetric key of a wrapper.
const LABEL_STORAGE: &[u8] = b"STORAGE";
/// KDFa label of the HMAC key of a wrapper.
const LABEL_INTEGRITY: &[u8] = b"INTEGRITY";
/// The only RSA size DPS uses for EK and SRK.
const RSA_BITS: u16 = 2048;

/// The DPS `authenticationKey` blob (§3.4 fields 1–6) and the HMAC key it carries.
#[derive(Clone, PartialEq, Eq)]
pub struct Activation {
    /// The blob, fields 1–6 concatenated.
    pub blob: Vec<u8>,
    /// The HMAC-SHA256 key the device will sign with once it has imported the blob.
    pub hmac_key: [u8; 32],
}

impl Activation {
    /// The blob in standard base64: the `authenticationKey` value.
    pub fn blob_base64(&self) -> String {
        STANDARD.encode(&self.blob)
    }

    /// The HMAC key in standard base64: what verifies the device's SAS tokens (and the hub
    /// device's `primaryKey`).
    pub fn hmac_key_base64(&self) -> String {
        STANDARD.encode(self.hmac_key)
    }
}

impl fmt::Debug for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Activation")
            .field("blob_len", &self.blob.len())
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

/// Every random input of the construction. [`build_activation`] draws them from openssl's
/// CSPRNG; tests pass fixed ones to [`build_activation_with`].
///
/// RSA-OAEP padding draws its own randomness, so fields 2 and 4 differ between runs even with
/// the same values here; fields 1, 3, 5 and 6 do not.
#[derive(Clone, PartialEq, Eq)]
pub struct ActivationRandomness {
    /// The HMAC key to wrap.
    pub hmac_key: [u8; 32],
    /// The credential: the AES-128 key of the inner wrapper.
    pub inner: [u8; 16],
    /// The credential seed, encrypted to the EK.
    pub seed: [u8; 32],
    /// The HMAC key object's obfuscation value (`seedValue`).
    pub obf: [u8; 32],
    /// The import seed, encrypted to the SRK.
    pub seed2: [u8; 32],
}

impl ActivationRandomness {
    /// Fresh values from openssl's CSPRNG.
    pub fn generate() -> Result<ActivationRandomness, ActivationError> {
        let mut r = ActivationRandomness {
            hmac_key: [0; 32],
            inner: [0; 16],
            seed: [0; 32],
            obf: [0; 32],
            seed2: [0; 32],
        };
        for buf in [
            &mut r.hmac_key[..],
            &mut r.inner[..],
            &mut r.seed[..],
            &mut r.obf[..],
            &mut r.seed2[..],
        ] {
            openssl::rand::rand_bytes(buf).map_err(crypto)?;
        }
        Ok(r)
    }
}

impl fmt::Debug for ActivationRandomness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ActivationRandomness { <redacted> }")
    }
}

/// Why no activation blob could be built.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    /// The EK or SRK is not a key the construction supports (RSA-2048, nameAlg SHA-256,
    /// AES-128-CFB); the message says which and why.
    #[error("unsupported TPM key for activation: {0}")]
    UnsupportedKey(&'static str),
    /// openssl refused an operation (e.g. an RSA public key it cannot encrypt to).
    #[error("activation blob cryptography failed: {0}")]
    Crypto(String),
}

fn crypto(e: ErrorStack) -> ActivationError {
    ActivationError::Crypto(e.to_string())
}

/// Builds the activation blob for a device with endorsement key `ek` and storage root key
/// `srk`, with fresh randomness (openssl's CSPRNG).
pub fn build_activation(ek: &TpmPublic, srk: &TpmPublic) -> Result<Activation, ActivationError> {
    build_activation_with(ek, srk, &ActivationRandomness::generate()?)
}

/// [`build_activation`] with every random input given. Deterministic except for the RSA-OAEP
/// padding of fields 2 and 4.
pub fn build_activation_with(
    ek: &TpmPublic,
    srk: &TpmPublic,
    randomness: &ActivationRandomness,
) -> Result<Activation, ActivationError> {
    check_key(ek, Role::Endorsement)?;
    check_key(srk, Role::StorageRoot)?;
    let r = randomness;

    // MakeCredential: `inner` bound to the SRK name, protected by the EK (whose nameAlg and
    // symmetric definition, SHA-256 and AES-128-CFB, the TPM uses to unwrap it).
    let credential_secret = oaep(ek, &r.seed, LABEL_IDENTITY)?;
    let id_object = wrap(&r.seed, &srk.name, &t2b(&r.inner)?)?;

    // The HMAC key object.
    let public_area = hmac_key_public_area(&r.obf, &r.hmac_key)?;
    let object_name = name(&public_area);
    let sensitive = t2b(&cat(&[
        &ALG_KEYEDHASH.to_be_bytes(),
        &t2b(&[])?,
        &t2b(&r.obf)?,
        &t2b(&r.hmac_key)?,
    ]))?;

    // Duplicate: inner wrapper with `inner`, outer wrapper with a seed protected by the SRK
    // (whose nameAlg and symmetric definition the TPM uses on import).
    let inner_integrity = sha256(&cat(&[&sensitive, &object_name]));
    let enc_sensitive = aes_cfb(&r.inner, &cat(&[&t2b(&inner_integrity)?, &sensitive]))?;
    let import_secret = oaep(srk, &r.seed2, LABEL_DUPLICATE)?;
    let duplicate = wrap(&r.seed2, &object_name, &enc_sensitive)?;

    let blob = cat(&[
        &t2b(&id_object)?,
        &t2b(&credential_secret)?,
        &t2b(&duplicate)?,
        &t2b(&import_secret)?,
        &t2b(&public_area)?,
        &0u16.to_be_bytes(),
    ]);
    Ok(Activation {
        blob,
        hmac_key: r.hmac_key,
    })
}

/// The `TPMT_PUBLIC` of the HMAC key: KEYEDHASH, nameAlg SHA-256, [`HMAC_KEY_ATTRIBUTES`],
/// empty `authPolicy`, scheme HMAC-SHA256, `unique = SHA256(obf ‖ hmac_key)` (48 bytes).
pub fn hmac_key_public_area(
    obf: &[u8; 32],
    hmac_key: &[u8; 32],
) -> Result<Vec<u8>, ActivationError> {
    let unique = sha256(&cat(&[obf, hmac_key]));
    Ok(cat(&[
        &ALG_KEYEDHASH.to_be_bytes(),
        &ALG_SHA256.to_be_bytes(),
        &HMAC_KEY_ATTRIBUTES.to_be_bytes(),
        &t2b(&[])?,
        &ALG_HMAC.to_be_bytes(),
        &ALG_SHA256.to_be_bytes(),
        &t2b(&unique)?,
    ]))
}

/// The protection both halves use (TPM 2.0 Part 1, "Protected Storage" and credential
/// protection): `enc = AESCFB(KDFa(seed, "STORAGE", name, "", 128), plaintext)`, then
/// `T2B(HMAC(KDFa(seed, "INTEGRITY", "", "", 256), enc ‖ name)) ‖ enc`.
fn wrap(seed: &[u8], name: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ActivationError> {
    let sym_key = kdfa(seed, LABEL_STORAGE, name, &[], 128);
    let encrypted = aes_cfb(&sym_key, plaintext)?;
    let hmac_key = kdfa(seed, LABEL_INTEGRITY, &[], &[], 256);
    let integrity = hmac_sha256(&hmac_key, &cat(&[&encrypted, name]));
    Ok(cat(&[&t2b(&integrity)?, &encrypted]))
}

/// Which of the device's keys is being checked, for the error message.
#[derive(Clone, Copy)]
enum Role {
    Endorsement,
    StorageRoot,
}

impl Role {
    fn not_rsa_2048(self) -> ActivationError {
        ActivationError::UnsupportedKey(match self {
            Role::Endorsement => "endorsement key is not RSA-2048",
            Role::StorageRoot => "storage root key is not RSA-2048",
        })
    }

    fn not_sha256(self) -> ActivationError {
        ActivationError::UnsupportedKey(match self {
            Role::Endorsement => "endorsement key nameAlg is not SHA-256",
            Role::StorageRoot => "storage root key nameAlg is not SHA-256",
        })
    }

    fn not_aes_128_cfb(self) -> ActivationError {
        ActivationError::UnsupportedKey(match self {
            Role::Endorsement => "endorsement key symmetric algorithm is not AES-128-CFB",
            Role::StorageRoot => "storage root key symmetric algorithm is not AES-128-CFB",
        })
    }
}

/// Checks what the construction relies on: RSA-2048 with a full 256-byte modulus (top bit
/// set), nameAlg SHA-256 (names, KDFa and HMACs) and AES-128-CFB (the wrappers' cipher).
fn check_key(key: &TpmPublic, role: Role) -> Result<(), ActivationError> {
    let TpmKeyType::Rsa { bits, .. } = key.key_type;
    let full_modulus = key.modulus.len() == usize::from(RSA_BITS / 8)
        && key.modulus.first().is_some_and(|b| b & 0x80 != 0);
    if bits != RSA_BITS || !full_modulus {
        return Err(role.not_rsa_2048());
    }
    if key.name_alg != ALG_SHA256 || key.name.len() != 2 + 32 {
        return Err(role.not_sha256());
    }
    let aes_128_cfb = Some(SymmetricDefinition {
        algorithm: ALG_AES,
        key_bits: 128,
        mode: ALG_CFB,
    });
    if key.symmetric != aes_128_cfb {
        return Err(role.not_aes_128_cfb());
    }
    Ok(())
}

/// RSAES-OAEP with SHA-256 for hash and MGF1, to the TPM key's public half.
fn oaep(key: &TpmPublic, message: &[u8], label: &[u8]) -> Result<Vec<u8>, ActivationError> {
    let n = BigNum::from_slice(&key.modulus).map_err(crypto)?;
    let e = BigNum::from_u32(key.exponent()).map_err(crypto)?;
    let rsa = Rsa::from_public_components(n, e).map_err(crypto)?;
    let pkey = PKey::from_rsa(rsa).map_err(crypto)?;
    let mut encrypter = Encrypter::new(&pkey).map_err(crypto)?;
    encrypter
        .set_rsa_padding(Padding::PKCS1_OAEP)
        .map_err(crypto)?;
    encrypter
        .set_rsa_oaep_md(MessageDigest::sha256())
        .map_err(crypto)?;
    encrypter
        .set_rsa_mgf1_md(MessageDigest::sha256())
        .map_err(crypto)?;
    encrypter.set_rsa_oaep_label(label).map_err(crypto)?;
    let mut out = vec![0; encrypter.encrypt_len(message).map_err(crypto)?];
    let len = encrypter.encrypt(message, &mut out).map_err(crypto)?;
    out.truncate(len);
    if out.len() != key.modulus.len() {
        return Err(ActivationError::Crypto(format!(
            "RSA-OAEP produced {} bytes for a {}-byte modulus",
            out.len(),
            key.modulus.len()
        )));
    }
    Ok(out)
}

/// AES-128 in CFB128 mode with a zero IV (TPM wrappers use a fresh key per blob).
fn aes_cfb(key: &[u8], data: &[u8]) -> Result<Vec<u8>, ActivationError> {
    symm::encrypt(Cipher::aes_128_cfb128(), key, Some(&[0u8; 16]), data).map_err(crypto)
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2): SP800-108 counter mode with HMAC-SHA256,
/// `HMAC(key, u32(i) ‖ label ‖ 0x00 ‖ context_u ‖ context_v ‖ u32(bits))` for i = 1, 2, …,
/// concatenated and truncated to `bits` (leading bits of the first byte cleared when `bits` is
/// not a multiple of 8).
pub(crate) fn kdfa(
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u16,
) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let len = usize::from(bits.div_ceil(8));
    let mut out = Vec::with_capacity(len);
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label);
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&u32::from(bits).to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    if !bits.is_multiple_of(8)
        && let Some(first) = out.first_mut()
    {
        *first &= (1u8 << (bits % 8)) - 1;
    }
    out
}

/// `Name` of a SHA-256 object: `u16(TPM_ALG_SHA256) ‖ SHA256(TPMT_PUBLIC)`.
pub(crate) fn name(public_area: &[u8]) -> Vec<u8> {
    cat(&[&ALG_SHA256.to_be_bytes(), &sha256(public_area)])
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// `T2B(x) = u16(len x) ‖ x`.
fn t2b(data: &[u8]) -> Result<Vec<u8>, ActivationError> {
    let len = u16::try_from(data.len())
        .map_err(|_| ActivationError::Crypto(format!("{} bytes do not fit a TPM2B", data.len())))?;
    Ok(cat(&[&len.to_be_bytes(), data]))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[cfg(test)]
mod tests;
