//! CA private keys encrypted at rest under a key-encryption key (KEK).
//!
//! A sealed key is PEM-armored with the label [`SEALED_LABEL`]; the armored bytes are a small
//! versioned envelope:
//!
//! ```text
//! version (1 byte, = 1) | KEK id (8 bytes) | nonce (12 bytes) | AES-256-GCM(key PEM) + tag (16 bytes)
//! ```
//!
//! The KEK id is the first 8 bytes of SHA-256 over a fixed label and the KEK: it tells "sealed
//! under another KEK" apart from "damaged" without revealing anything about the KEK. The
//! version byte and the KEK id are authenticated as associated data, so neither can be swapped.
//! The nonce is random (ring's `SystemRandom`) unless the caller passes one (tests).
//!
//! Pure: bytes in, bytes out. Reading the KEK from a file or the environment is the service's
//! job, and so is deciding what to seal.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest;
use ring::rand::{SecureRandom as _, SystemRandom};
use x509_parser::pem::Pem;

use crate::{SecretPem, pem};

/// The PEM label of a sealed key.
pub const SEALED_LABEL: &str = "ZEROTOUCH ENCRYPTED KEY";
/// The envelope version this crate writes and reads.
const VERSION: u8 = 1;
/// Length of a KEK: AES-256.
pub const KEK_LEN: usize = 32;
const KEK_ID_LEN: usize = 8;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEK_ID_LEN + NONCE_LEN;

/// Why a key could not be sealed or opened. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The KEK is not 32 bytes (after base64 decoding, for [`Kek::from_base64`]).
    #[error("the key-encryption key must be {KEK_LEN} bytes, base64-encoded (got {found} bytes)")]
    InvalidKekLength {
        /// How many bytes there were.
        found: usize,
    },
    /// The KEK text is not base64.
    #[error("the key-encryption key is not valid base64")]
    InvalidKekEncoding,
    /// The input is not one `ZEROTOUCH ENCRYPTED KEY` PEM block with a whole envelope.
    #[error("not a sealed key: {reason}")]
    Malformed {
        /// A fixed text or the PEM parser's message.
        reason: String,
    },
    /// The envelope version is not one this build reads.
    #[error("sealed key version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The key was sealed under a different KEK.
    #[error(
        "the key was sealed under another key-encryption key (id {sealed_with}, given {given})"
    )]
    WrongKek {
        /// The id of the KEK the key was sealed with.
        sealed_with: String,
        /// The id of the KEK given.
        given: String,
    },
    /// The KEK id matches but decryption failed: the file was altered or damaged.
    #[error("the sealed key does not decrypt: it was altered or damaged")]
    Damaged,
    /// The random number generator or the cipher failed.
    #[error("sealing failed: {0}")]
    Crypto(&'static str),
}

/// A key-encryption key: 32 bytes for AES-256-GCM. `Debug` prints only its id.
#[derive(Clone)]
pub struct Kek {
    bytes: [u8; KEK_LEN],
}

impl Kek {
    /// A KEK from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Kek, SealError> {
        let bytes: [u8; KEK_LEN] = bytes
            .try_into()
            .map_err(|_| SealError::InvalidKekLength { found: bytes.len() })?;
        Ok(Kek { bytes })
    }

    /// A KEK from base64 text (standard alphabet; surrounding whitespace is ignored), as
    /// `openssl rand -base64 32` prints it.
    pub fn from_base64(text: &str) -> Result<Kek, SealError> {
        let decoded = STANDARD
            .decode(text.trim())
            .map_err(|_| SealError::InvalidKekEncoding)?;
        Kek::from_bytes(&decoded)
    }

    /// A new random KEK (for tests and `ca` tooling).
    pub fn generate() -> Result<Kek, SealError> {
        let mut bytes = [0u8; KEK_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealError::Crypto("the system random number generator failed"))?;
        Ok(Kek { bytes })
    }

    /// The KEK as base64, to write a KEK file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.bytes)
    }

    /// A public identifier of this KEK: 16 hex digits of a hash. Safe to log.
    pub fn id(&self) -> String {
        hex_lower(&self.id_bytes())
    }

    fn id_bytes(&self) -> [u8; KEK_ID_LEN] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"zerotouch kek id v1\0");
        ctx.update(&self.bytes);
        let hash = ctx.finish();
        let mut id = [0u8; KEK_ID_LEN];
        id.copy_from_slice(&hash.as_ref()[..KEK_ID_LEN]);
        id
    }

    fn cipher(&self) -> Result<LessSafeKey, SealError> {
        UnboundKey::new(&AES_256_GCM, &self.bytes)
            .map(LessSafeKey::new)
            .map_err(|_| SealError::Crypto("the cipher rejected the key"))
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("id", &self.id()).finish()
    }
}

/// Whether `text` is a sealed key (starts with the sealed PEM label, after whitespace).
/// Says nothing about whether it opens.
pub fn is_sealed(text: &str) -> bool {
    text.trim_start()
        .starts_with(&format!("-----BEGIN {SEALED_LABEL}-----"))
}

/// Seals a private key under `kek` with a random nonce.
pub fn seal(key: &SecretPem, kek: &Kek) -> Result<String, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Crypto("the system random number generator failed"))?;
    seal_with_nonce(key, kek, nonce)
}

/// Seals a private key under `kek` with the given nonce. A nonce must never be used twice with
/// one KEK: use [`seal`] unless the nonce comes from a random source already.
pub fn seal_with_nonce(
    key: &SecretPem,
    kek: &Kek,
    nonce: [u8; NONCE_LEN],
) -> Result<String, SealError> {
    let mut envelope = Vec::with_capacity(HEADER_LEN + key.expose().len() + TAG_LEN);
    envelope.push(VERSION);
    envelope.extend_from_slice(&kek.id_bytes());
    envelope.extend_from_slice(&nonce);
    let mut body = key.expose().as_bytes().to_vec();
    kek.cipher()?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&envelope[..1 + KEK_ID_LEN]),
            &mut body,
        )
        .map_err(|_| SealError::Crypto("encryption failed"))?;
    envelope.extend_from_slice(&body);
    Ok(pem::encode(SEALED_LABEL, &envelope))
}

/// Opens a sealed key with `kek`.
pub fn open(sealed: &str, kek: &Kek) -> Result<SecretPem, SealError> {
    let mut blocks = Pem::iter_from_buffer(sealed.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SealError::Malformed {
            reason: e.to_string(),
        })?;
    if blocks.len() != 1 {
        return Err(SealError::Malformed {
            reason: format!("expected one PEM block, found {}", blocks.len()),
        });
    }
    let block = blocks.remove(0);
    if block.label != SEALED_LABEL {
        return Err(SealError::Malformed {
            reason: format!("the PEM label is {:?}", block.label),
        });
    }
    let envelope = block.contents;
    let Some(&version) = envelope.first() else {
        return Err(SealError::Malformed {
            reason: "empty envelope".into(),
        });
    };
    if version != VERSION {
        return Err(SealError::UnsupportedVersion(version));
    }
    if envelope.len() < HEADER_LEN + TAG_LEN {
        return Err(SealError::Malformed {
            reason: "the envelope is truncated".into(),
        });
    }
    let (header, ciphertext) = envelope.split_at(HEADER_LEN);
    let sealed_with = &header[1..1 + KEK_ID_LEN];
    if sealed_with != kek.id_bytes() {
        return Err(SealError::WrongKek {
            sealed_with: hex_lower(sealed_with),
            given: kek.id(),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&header[1 + KEK_ID_LEN..]);
    let mut body = ciphertext.to_vec();
    let plain = kek
        .cipher()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header[..1 + KEK_ID_LEN]),
            &mut body,
        )
        .map_err(|_| SealError::Damaged)?;
    let text = String::from_utf8(plain.to_vec()).map_err(|_| SealError::Damaged)?;
    Ok(SecretPem::new(text))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretPem {
        // A real key, made now: no key material is ever committed.
        SecretPem::new(rcgen::KeyPair::generate().unwrap().serialize_pem())
    }

    #[test]
    fn round_trip_and_no_plaintext_on_disk() {
        let kek = Kek::generate().unwrap();
        let key = key();
        let sealed = seal(&key, &kek).unwrap();
        assert!(is_sealed(&sealed));
        assert!(sealed.starts_with("-----BEGIN ZEROTOUCH ENCRYPTED KEY-----\n"));
        assert!(!sealed.contains("PRIVATE"));
        assert!(!is_sealed(key.expose()));
        assert_eq!(open(&sealed, &kek).unwrap(), key);
        // Random nonces: sealing twice gives two different texts.
        assert_ne!(seal(&key, &kek).unwrap(), sealed);
    }

    #[test]
    fn fixed_nonce_is_deterministic() {
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let key = SecretPem::new("not really a key".into());
        let a = seal_with_nonce(&key, &kek, [1; 12]).unwrap();
        assert_eq!(a, seal_with_nonce(&key, &kek, [1; 12]).unwrap());
        assert_eq!(open(&a, &kek).unwrap(), key);
    }

    #[test]
    fn wrong_kek_is_named_by_id() {
        let kek = Kek::generate().unwrap();
        let other = Kek::generate().unwrap();
        let sealed = seal(&key(), &kek).unwrap();
        assert_eq!(
            open(&sealed, &other),
            Err(SealError::WrongKek {
                sealed_with: kek.id(),
                given: other.id(),
            })
        );
    }

    #[test]
    fn tampering_is_detected() {
        let kek = Kek::from_bytes(&[9u8; 32]).unwrap();
        let sealed = seal_with_nonce(&SecretPem::new("secret".into()), &kek, [0; 12]).unwrap();
        let der = Pem::iter_from_buffer(sealed.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .contents;
        // Flip one bit of the ciphertext, then of the nonce.
        for index in [der.len() - 1, HEADER_LEN - 1] {
            let mut bad = der.clone();
            bad[index] ^= 1;
            assert_eq!(
                open(&pem::encode(SEALED_LABEL, &bad), &kek),
                Err(SealError::Damaged)
            );
        }
        let mut other_version = der.clone();
        other_version[0] = 2;
        assert_eq!(
            open(&pem::encode(SEALED_LABEL, &other_version), &kek),
            Err(SealError::UnsupportedVersion(2))
        );
        assert!(matches!(
            open(&pem::encode(SEALED_LABEL, &der[..HEADER_LEN]), &kek),
            Err(SealError::Malformed { .. })
        ));
        assert!(matches!(
            open(&pem::encode("PRIVATE KEY", &der), &kek),
            Err(SealError::Malformed { .. })
        ));
        assert!(matches!(
            open("garbage", &kek),
            Err(SealError::Malformed { .. })
        ));
    }

    #[test]
    fn kek_parsing() {
        let kek = Kek::generate().unwrap();
        let text = format!("{}\n", kek.to_base64());
        assert_eq!(Kek::from_base64(&text).unwrap().id(), kek.id());
        assert_eq!(
            Kek::from_base64("c2hvcnQ=").err(),
            Some(SealError::InvalidKekLength { found: 5 })
        );
        assert_eq!(
            Kek::from_base64("not base64!").err(),
            Some(SealError::InvalidKekEncoding)
        );
        let debug = format!("{kek:?}");
        assert!(debug.contains(&kek.id()) && !debug.contains(&kek.to_base64()));
        assert_eq!(kek.id().len(), 16);
    }
}
