//! The intermediate CA key inside a PKCS#11 token (an HSM, or SoftHSM2 in tests).
//!
//! **This module is the crate's one exception to "no I/O"**: it loads a PKCS#11 library
//! (a shared object named by the operator) and talks to a token through it. Everything else in
//! the crate stays pure; a [`CaHierarchy`](crate::CaHierarchy) built with
//! [`CaHierarchy::from_pem_with_token_key`](crate::CaHierarchy::from_pem_with_token_key)
//! signs through a [`Pkcs11Key`] and never sees the private key.
//!
//! Only EC P-256 keys are supported. Signing hashes the message locally (SHA-256, ring) and
//! asks the token for a raw `CKM_ECDSA` signature over the digest; the token's `r || s` is
//! re-encoded as a DER `ECDSA-Sig-Value`. The public key is the token's `CKA_EC_POINT` of the
//! public-key object with the same label.
//!
//! [`import_p256_key`] provisions a token once: it copies a PEM key in as a sensitive,
//! non-extractable signing key. The PIN is only passed to `C_Login`; it is never formatted
//! into an error.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};
use ring::digest;

use crate::{Error, SecretPem};

/// DER of the named curve prime256v1 (1.2.840.10045.3.1.7), the `CKA_EC_PARAMS` of P-256.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// An uncompressed P-256 point: `04 || x || y`.
const POINT_LEN: usize = 65;
/// A P-256 scalar, and each half of the token's raw signature.
const SCALAR_LEN: usize = 32;

/// Where the token is: the PKCS#11 library, the token's label and the user PIN.
#[derive(Clone, Copy)]
pub struct Token<'a> {
    /// The PKCS#11 shared library, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: &'a Path,
    /// The label the token was initialised with.
    pub token_label: &'a str,
    /// The user PIN.
    pub pin: &'a str,
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"[redacted]")
            .finish()
    }
}

/// An EC P-256 private key held in a PKCS#11 token, usable as rcgen's [`SigningKey`].
///
/// Cheap to clone (the session is shared behind a mutex: PKCS#11 sessions are not meant for
/// concurrent use).
#[derive(Clone)]
pub struct Pkcs11Key {
    inner: Arc<Inner>,
}

struct Inner {
    session: Mutex<Session>,
    key: ObjectHandle,
    point: Vec<u8>,
    label: String,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("label", &self.inner.label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Key {
    /// Logs in to `token` and finds the private key labelled `key_label` (class private key,
    /// type EC) and the public-key object with the same label, whose `CKA_EC_POINT` becomes
    /// the public key. Exactly one private key must carry the label.
    pub fn open(token: Token<'_>, key_label: &str) -> Result<Pkcs11Key, Error> {
        let session = login(token)?;
        let label = Attribute::Label(key_label.as_bytes().to_vec());
        let keys = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                label.clone(),
            ])
            .map_err(ck("finding the private key"))?;
        let key = match keys.as_slice() {
            [key] => *key,
            [] => {
                return Err(Error::Pkcs11(format!(
                    "no EC private key labelled {key_label:?} in token {:?}",
                    token.token_label
                )));
            }
            _ => {
                return Err(Error::Pkcs11(format!(
                    "{} private keys are labelled {key_label:?}; exactly one is needed",
                    keys.len()
                )));
            }
        };
        let public = session
            .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), label])
            .map_err(ck("finding the public key"))?;
        let public = public.first().copied().ok_or_else(|| {
            Error::Pkcs11(format!(
                "no public key labelled {key_label:?} next to the private key"
            ))
        })?;
        let attributes = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(ck("reading CKA_EC_POINT"))?;
        let point = attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(bytes) => Some(bytes),
                _ => None,
            })
            .ok_or_else(|| Error::Pkcs11("the public key has no CKA_EC_POINT".into()))?;
        let point = unwrap_point(&point)?;
        Ok(Pkcs11Key {
            inner: Arc::new(Inner {
                session: Mutex::new(session),
                key,
                point,
                label: key_label.to_owned(),
            }),
        })
    }

    /// The label of the key in the token.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Whether the token reports the private key as `CKA_SENSITIVE` and not
    /// `CKA_EXTRACTABLE`: it cannot be read out.
    pub fn is_sensitive_and_not_extractable(&self) -> Result<bool, Error> {
        let session = self
            .inner
            .session
            .lock()
            .map_err(|_| Error::Pkcs11("the session lock is poisoned".into()))?;
        let attributes = session
            .get_attributes(
                self.inner.key,
                &[AttributeType::Sensitive, AttributeType::Extractable],
            )
            .map_err(ck("reading CKA_SENSITIVE and CKA_EXTRACTABLE"))?;
        let mut sensitive = false;
        let mut extractable = true;
        for attribute in attributes {
            match attribute {
                Attribute::Sensitive(value) => sensitive = value,
                Attribute::Extractable(value) => extractable = value,
                _ => {}
            }
        }
        Ok(sensitive && !extractable)
    }

    fn sign_digest(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let hash = digest::digest(&digest::SHA256, msg);
        let session = self
            .inner
            .session
            .lock()
            .map_err(|_| Error::Pkcs11("the session lock is poisoned".into()))?;
        let raw = session
            .sign(&Mechanism::Ecdsa, self.inner.key, hash.as_ref())
            .map_err(ck("C_Sign"))?;
        raw_to_der(&raw)
    }
}

impl PublicKeyData for Pkcs11Key {
    fn der_bytes(&self) -> &[u8] {
        &self.inner.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for Pkcs11Key {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_digest(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// Copies the P-256 key `key` (PKCS#8 PEM, as Zerotouch writes CA keys) into `token` under
/// `key_label`: a private key with `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`,
/// `!CKA_EXTRACTABLE` and `CKA_SIGN`, and its public key, both with `CKA_LABEL = key_label`
/// and `CKA_ID` = the SHA-1 of the public point. Refuses if the label is taken. Checks the
/// result by opening it and comparing public keys.
pub fn import_p256_key(
    token: Token<'_>,
    key_label: &str,
    key: &SecretPem,
) -> Result<Pkcs11Key, Error> {
    let pair = KeyPair::from_pem(key.expose()).map_err(|e| Error::InvalidPem {
        what: "key to import",
        reason: e.to_string(),
    })?;
    if pair.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(Error::UnsupportedSigningKey);
    }
    let scalar = p256_scalar(&pair.serialize_der())?;
    let point = pair.public_key_raw().to_vec();
    let id = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &point)
        .as_ref()
        .to_vec();
    let label = Attribute::Label(key_label.as_bytes().to_vec());
    {
        let session = login(token)?;
        let taken = session
            .find_objects(std::slice::from_ref(&label))
            .map_err(ck("looking for the label"))?;
        if !taken.is_empty() {
            return Err(Error::Pkcs11(format!(
                "token {:?} already holds objects labelled {key_label:?}",
                token.token_label
            )));
        }
        session
            .create_object(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Value(scalar),
                label.clone(),
                Attribute::Id(id.clone()),
            ])
            .map_err(ck("creating the private key"))?;
        session
            .create_object(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::EcPoint(yasna::construct_der(|w| w.write_bytes(&point))),
                label,
                Attribute::Id(id),
            ])
            .map_err(ck("creating the public key"))?;
    }
    let imported = Pkcs11Key::open(token, key_label)?;
    if imported.inner.point != point {
        return Err(Error::KeyMismatch {
            what: "imported token",
        });
    }
    if !imported.is_sensitive_and_not_extractable()? {
        return Err(Error::Pkcs11(
            "the token did not keep the key sensitive and non-extractable".into(),
        ));
    }
    Ok(imported)
}

/// Loads the library, finds the token by label, opens a read-write session and logs in.
fn login(token: Token<'_>) -> Result<Session, Error> {
    let context = Pkcs11::new(token.module).map_err(|e| {
        Error::Pkcs11(format!(
            "loading the library {}: {e}",
            token.module.display()
        ))
    })?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(Error::Pkcs11(format!("C_Initialize: {e}"))),
    }
    let slots = context
        .get_slots_with_token()
        .map_err(ck("listing the slots"))?;
    let mut found = None;
    for slot in slots {
        let info = context
            .get_token_info(slot)
            .map_err(ck("reading the token info"))?;
        if info.label().trim_end() == token.token_label {
            found = Some(slot);
            break;
        }
    }
    let slot =
        found.ok_or_else(|| Error::Pkcs11(format!("no token labelled {:?}", token.token_label)))?;
    let session = context
        .open_rw_session(slot)
        .map_err(ck("opening a session"))?;
    let pin = AuthPin::from(token.pin.to_owned());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(Error::Pkcs11(format!(
            "logging in to token {:?}: {e}",
            token.token_label
        ))),
    }
}

fn ck(what: &'static str) -> impl Fn(CkError) -> Error {
    move |e| Error::Pkcs11(format!("{what}: {e}"))
}

/// `CKA_EC_POINT` is a DER OCTET STRING holding the uncompressed point; some tokens return
/// the bare point. Either way the result is the 65-byte point.
fn unwrap_point(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let point = match bytes {
        [0x04, len, rest @ ..] if usize::from(*len) == POINT_LEN && rest.len() == POINT_LEN => rest,
        _ if bytes.len() == POINT_LEN => bytes,
        _ => {
            return Err(Error::Pkcs11(
                "CKA_EC_POINT is not an uncompressed P-256 point".into(),
            ));
        }
    };
    if point.first() != Some(&0x04) {
        return Err(Error::Pkcs11(
            "CKA_EC_POINT is not an uncompressed P-256 point".into(),
        ));
    }
    Ok(point.to_vec())
}

/// The token's raw `r || s` as a DER `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`.
fn raw_to_der(raw: &[u8]) -> Result<Vec<u8>, Error> {
    if raw.len() != 2 * SCALAR_LEN {
        return Err(Error::Pkcs11(format!(
            "C_Sign returned {} bytes, not the {} of a P-256 signature",
            raw.len(),
            2 * SCALAR_LEN
        )));
    }
    let (r, s) = raw.split_at(SCALAR_LEN);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(&der_unsigned_integer(r));
            w.next().write_der(&der_unsigned_integer(s));
        })
    }))
}

/// A DER INTEGER for the unsigned big-endian `bytes`: leading zeros dropped, one zero added
/// back when the top bit is set (so it stays positive).
fn der_unsigned_integer(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    let trimmed = bytes.get(start..).unwrap_or_default();
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    let mut out = vec![0x02, u8::try_from(content.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(&content);
    out
}

/// The private scalar of a PKCS#8 EC key: `PrivateKeyInfo.privateKey` holds an RFC 5915
/// `ECPrivateKey`, whose second field is the scalar. Left-padded to 32 bytes.
fn p256_scalar(pkcs8: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = |e: yasna::ASN1Error| Error::InvalidPem {
        what: "key to import",
        reason: format!("not a PKCS#8 EC key: {e}"),
    };
    let ec_private_key = yasna::parse_der(pkcs8, |r| {
        r.read_sequence(|r| {
            r.next().read_u8()?;
            r.next().read_der()?;
            let inner = r.next().read_bytes()?;
            r.read_optional(|r| r.read_der())?;
            r.read_optional(|r| r.read_der())?;
            Ok(inner)
        })
    })
    .map_err(bad)?;
    let scalar = yasna::parse_der(&ec_private_key, |r| {
        r.read_sequence(|r| {
            r.next().read_u8()?;
            let scalar = r.next().read_bytes()?;
            r.read_optional(|r| r.read_der())?;
            r.read_optional(|r| r.read_der())?;
            Ok(scalar)
        })
    })
    .map_err(bad)?;
    if scalar.is_empty() || scalar.len() > SCALAR_LEN {
        return Err(Error::InvalidPem {
            what: "key to import",
            reason: "the EC private scalar is not 32 bytes".into(),
        });
    }
    let mut padded = vec![0u8; SCALAR_LEN - scalar.len()];
    padded.extend_from_slice(&scalar);
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[63] = 0x01; // s is 1 after stripping zeros
        let der = raw_to_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x21, 0x00]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
        assert!(raw_to_der(&[0u8; 10]).is_err());
        assert_eq!(der_unsigned_integer(&[0, 0]), vec![0x02, 0x01, 0x00]);
    }

    #[test]
    fn points_are_unwrapped() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let wrapped = yasna::construct_der(|w| w.write_bytes(&point));
        assert_eq!(unwrap_point(&wrapped).unwrap(), point);
        assert_eq!(unwrap_point(&point).unwrap(), point);
        assert!(unwrap_point(&point[..10]).is_err());
    }

    #[test]
    fn the_scalar_of_a_generated_key_is_found() {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let scalar = p256_scalar(&pair.serialize_der()).unwrap();
        assert_eq!(scalar.len(), 32);
        let reloaded = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &scalar,
            pair.public_key_raw(),
            &ring::rand::SystemRandom::new(),
        );
        assert!(reloaded.is_ok());
    }

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let token = Token {
            module: Path::new("/nonexistent/libpkcs11.so"),
            token_label: "zt",
            pin: "1234",
        };
        let err = Pkcs11Key::open(token, "k").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/libpkcs11.so"), "{err}");
        assert!(!err.contains("1234"), "{err}");
    }
}
