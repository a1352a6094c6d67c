//! Symmetric-key attestation: SAS tokens signed with an enrollment key (or a key derived from
//! an enrollment group key), as described in the DPS protocol notes §3.1–3.2.
//!
//! The signature covers the `sr` value *exactly as the device sent it* (still URL-encoded),
//! because SDKs disagree on hex case (`%2F` from Python, `%2f` from C) and each signs its own
//! spelling. The decoded resource is compared separately, case-insensitively.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use ring::hmac;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::{AttestedIdentity, Attestor, EnrollmentRef, Mechanism};

/// How far past its `se` a token is still accepted, for devices whose clock runs behind.
pub const CLOCK_SKEW_SECS: u64 = 30;

/// The scheme word that precedes the fields in an `Authorization` header or MQTT password.
pub const SCHEME: &str = "SharedAccessSignature";

/// Everything except the RFC 3986 unreserved characters `A-Z a-z 0-9 - . _ ~` is encoded.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Smallest and largest accepted key, in bytes after base64 decoding (Azure's limits).
const KEY_LEN: std::ops::RangeInclusive<usize> = 16..=64;
/// Length of generated keys, in bytes; what DPS generates.
const GENERATED_KEY_LEN: usize = 64;

/// Why a SAS token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SasError {
    /// The token is not syntactically a SAS token; the text says which part is wrong.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// A required field (`sr`, `sig` or `se`) is absent.
    #[error("SAS token has no `{0}` field")]
    MissingField(&'static str),
    /// The signature is authentic but `se` has passed (beyond [`CLOCK_SKEW_SECS`]).
    #[error("SAS token has expired")]
    Expired,
    /// No key produced this signature.
    #[error("SAS token signature does not match")]
    SignatureMismatch,
    /// None of the keys to verify against is usable (all empty or not base64).
    #[error("no usable key to verify the SAS token against")]
    NoUsableKey,
    /// A key given for signing or derivation is empty or not base64.
    #[error("key is not non-empty base64")]
    InvalidKey,
}

/// Why a symmetric key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is not standard (padded) base64.
    #[error("key is not valid base64")]
    NotBase64,
    /// The key decodes to a length outside 16..=64 bytes.
    #[error("key must be 16 to 64 bytes, got {len}")]
    InvalidLength {
        /// Decoded length in bytes.
        len: usize,
    },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
}

/// A parsed SAS token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// The resource exactly as received, still URL-encoded: this is what was signed.
    pub sr: String,
    /// The signature, URL-decoded: standard base64 of the HMAC.
    pub sig: String,
    /// Expiry, Unix seconds.
    pub se: u64,
    /// The key name, URL-decoded, if the field was present (it may be empty).
    pub skn: Option<String>,
}

impl SasToken {
    /// Parses a token, with or without the leading `SharedAccessSignature ` (any case).
    ///
    /// Fields are `&`-separated `name=value` pairs in any order; empty segments and unknown
    /// names are ignored, a repeated known name is an error. `se` must be plain decimal digits
    /// without a sign or leading zeros (so that it re-serialises to the signed text), `sig`
    /// must be base64 after URL-decoding, and `sr` must be non-empty.
    pub fn parse(header_value: &str) -> Result<SasToken, SasError> {
        let value = header_value.trim();
        let body = match value.get(..SCHEME.len()) {
            Some(word) if word.eq_ignore_ascii_case(SCHEME) => {
                let rest = value.get(SCHEME.len()..).unwrap_or_default();
                if !rest.starts_with(char::is_whitespace) {
                    return Err(SasError::Malformed("no space after the scheme"));
                }
                rest.trim_start()
            }
            _ => value,
        };

        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        let mut skn = None;
        for field in body.split('&').filter(|f| !f.is_empty()) {
            let (name, value) = field
                .split_once('=')
                .ok_or(SasError::Malformed("field without `=`"))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::Malformed("repeated field"));
            }
        }

        let sr = sr.ok_or(SasError::MissingField("sr"))?;
        if sr.is_empty() {
            return Err(SasError::Malformed("sr is empty"));
        }
        let sig = url_decode(sig.ok_or(SasError::MissingField("sig"))?)
            .ok_or(SasError::Malformed("sig is not UTF-8"))?;
        if STANDARD.decode(&sig).is_err() {
            return Err(SasError::Malformed("sig is not base64"));
        }
        let se = parse_expiry(se.ok_or(SasError::MissingField("se"))?)?;
        let skn = match skn {
            Some(skn) => Some(url_decode(skn).ok_or(SasError::Malformed("skn is not UTF-8"))?),
            None => None,
        };
        Ok(SasToken {
            sr: sr.to_owned(),
            sig,
            se,
            skn,
        })
    }

    /// The resource with `%XX` escapes decoded (either hex case). `+` stays `+`.
    pub fn resource_decoded(&self) -> Result<String, SasError> {
        url_decode(&self.sr).ok_or(SasError::Malformed("sr is not UTF-8 after decoding"))
    }

    /// Whether the decoded resource is `{id_scope}/registrations/{registration_id}`, compared
    /// case-insensitively (step 3 of the server checks in §3.1).
    pub fn is_for_registration(&self, id_scope: &str, registration_id: &str) -> bool {
        self.resource_decoded().is_ok_and(|r| {
            r.eq_ignore_ascii_case(&registration_resource(id_scope, registration_id))
        })
    }

    /// Whether `skn` is one DPS accepts from devices: absent, empty (older C SDKs send
    /// `skn=`) or `registration`.
    pub fn key_name_is_acceptable(&self) -> bool {
        matches!(self.skn.as_deref(), None | Some("") | Some("registration"))
    }
}

/// The plain (not URL-encoded) resource a device signs for: `{id_scope}/registrations/{id}`.
pub fn registration_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// Verifies `token` against each of `keys` (standard base64) in order and returns the index of
/// the first key that produced the signature.
///
/// The signature is `base64(HMAC-SHA256(key, sr_as_received + "\n" + se))`, compared in
/// constant time. Keys that are not base64 or decode to nothing are skipped (if that leaves
/// none: [`SasError::NoUsableKey`]). Only an authentic token is then checked for expiry: it is
/// [`SasError::Expired`] when `se + CLOCK_SKEW_SECS <= now_unix`. The resource and `skn` are
/// not checked here; see [`SasToken::is_for_registration`] and
/// [`SasToken::key_name_is_acceptable`].
pub fn verify(token: &SasToken, keys: &[&str], now_unix: u64) -> Result<usize, SasError> {
    verify_with(token, keys, now_unix, decode_key)
}

/// [`verify`] as Service Bus and Event Hubs clients sign: the HMAC key is the key's text
/// itself (its UTF-8 bytes), not what its base64 decodes to. Event Hubs SDKs sign so for any
/// connection string, IoT Hub's Event Hubs-compatible one included.
pub fn verify_text_key(token: &SasToken, keys: &[&str], now_unix: u64) -> Result<usize, SasError> {
    verify_with(token, keys, now_unix, |key| {
        (!key.is_empty()).then(|| key.as_bytes().to_vec())
    })
}

fn verify_with(
    token: &SasToken,
    keys: &[&str],
    now_unix: u64,
    key_bytes: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<usize, SasError> {
    let signature = STANDARD
        .decode(&token.sig)
        .map_err(|_| SasError::Malformed("sig is not base64"))?;
    let message = string_to_sign(&token.sr, token.se);
    let mut usable = false;
    let mut matched = None;
    for (index, key) in keys.iter().enumerate() {
        let Some(key) = key_bytes(key) else { continue };
        usable = true;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
        if hmac::verify(&key, message.as_bytes(), &signature).is_ok() {
            matched = Some(index);
            break;
        }
    }
    let index = match (matched, usable) {
        (Some(index), _) => index,
        (None, true) => return Err(SasError::SignatureMismatch),
        (None, false) => return Err(SasError::NoUsableKey),
    };
    if token.se.saturating_add(CLOCK_SKEW_SECS) <= now_unix {
        return Err(SasError::Expired);
    }
    Ok(index)
}

/// Produces a complete token, `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`, the way the
/// Python SDK does: `resource` percent-encoded with upper-case hex (everything but
/// `A-Za-z0-9-._~`), the base64 signature percent-encoded the same way.
pub fn sign(
    resource: &str,
    key_b64: &str,
    expiry_unix: u64,
    key_name: Option<&str>,
) -> Result<String, SasError> {
    let key = decode_key(key_b64).ok_or(SasError::InvalidKey)?;
    let sr = utf8_percent_encode(resource, ENCODE).to_string();
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key),
        string_to_sign(&sr, expiry_unix).as_bytes(),
    );
    let sig = STANDARD.encode(tag.as_ref());
    let mut token = format!(
        "{SCHEME} sr={sr}&sig={}&se={expiry_unix}",
        utf8_percent_encode(&sig, ENCODE)
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.extend(utf8_percent_encode(name, ENCODE));
    }
    Ok(token)
}

/// The device key of `registration_id` in a symmetric-key enrollment group:
/// `base64(HMAC-SHA256(base64decode(group_key), utf8(registration_id)))`.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, SasError> {
    let key = decode_key(group_key_b64).ok_or(SasError::InvalidKey)?;
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key),
        registration_id.as_bytes(),
    );
    Ok(STANDARD.encode(tag.as_ref()))
}

/// A new random 64-byte key, standard base64, as DPS generates for enrollments.
///
/// Returns an error rather than panicking if the OS random number generator fails.
pub fn generate_key() -> Result<String, KeyError> {
    let mut key = [0u8; GENERATED_KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| KeyError::Rng)?;
    Ok(STANDARD.encode(key))
}

/// Checks that a key supplied for an enrollment is standard base64 of 16 to 64 bytes.
pub fn validate_key(key_b64: &str) -> Result<(), KeyError> {
    let key = STANDARD.decode(key_b64).map_err(|_| KeyError::NotBase64)?;
    if KEY_LEN.contains(&key.len()) {
        Ok(())
    } else {
        Err(KeyError::InvalidLength { len: key.len() })
    }
}

/// The keys of the individual enrollment whose registration id the device claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymmetricKeyEnrollment {
    /// `primaryKey`, standard base64.
    pub primary_key: String,
    /// `secondaryKey`, standard base64.
    pub secondary_key: String,
    /// `provisioningStatus == "enabled"`.
    pub enabled: bool,
}

/// A symmetric-key enrollment group: devices sign with keys derived from these
/// ([`derive_device_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymmetricKeyGroup {
    /// `enrollmentGroupId`.
    pub group_id: String,
    /// `primaryKey`, standard base64.
    pub primary_key: String,
    /// `secondaryKey`, standard base64.
    pub secondary_key: String,
    /// `provisioningStatus == "enabled"`.
    pub enabled: bool,
}

/// What a device presents for symmetric-key attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasEvidence {
    /// The registration id from the URL (HTTPS) or the MQTT username.
    pub registration_id: String,
    /// The parsed `Authorization` header or MQTT password.
    pub token: SasToken,
}

/// Symmetric-key attestation (§3.1–3.2) over the candidate enrollments of one registration.
///
/// Build it from what storage holds: the individual symmetric-key enrollment with the claimed
/// registration id, if there is one, and every symmetric-key enrollment group, enabled or not
/// (a disabled group must still be tried so that its devices hear `disabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymmetricKeyAttestor {
    /// This instance's ID scope; the token's resource must name it.
    pub id_scope: String,
    /// The individual enrollment for the claimed registration id, if any. When present it
    /// decides alone: groups are not tried.
    pub individual: Option<SymmetricKeyEnrollment>,
    /// The symmetric-key enrollment groups.
    pub groups: Vec<SymmetricKeyGroup>,
}

/// Why symmetric-key attestation refused a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SymmetricKeyAttestationError {
    /// The token's decoded `sr` is not `{idScope}/registrations/{registrationId}`.
    #[error("the SAS token is not for this registration")]
    WrongResource,
    /// `skn` is present with a value other than empty or `registration`.
    #[error("the SAS token's key name is not accepted")]
    KeyName,
    /// The token is syntactically broken (its `sig` is not base64).
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// An enrollment key produced the signature, but the token has expired.
    #[error("the SAS token has expired")]
    Expired,
    /// No enrollment key (or derived group key) produced the signature.
    #[error("no enrollment matches the SAS token")]
    Unauthorized,
    /// The token is authentic for an enrollment or group that is disabled.
    #[error("the matching enrollment is disabled")]
    Disabled,
}

impl Attestor for SymmetricKeyAttestor {
    type Evidence = SasEvidence;
    type Error = SymmetricKeyAttestationError;

    /// Checks, in order: the resource names this ID scope and registration id
    /// (case-insensitively); `skn` is acceptable; then the individual enrollment's primary and
    /// secondary keys, if there is an individual enrollment; otherwise the keys derived from
    /// every group's primary and secondary key for this registration id.
    ///
    /// A token that verifies with a disabled enrollment is [`Disabled`]. If it verifies with
    /// several groups (they share a key) and any of them is disabled, that is [`Disabled`] too
    /// (fail closed); otherwise the first matching group in `groups` order wins. An authentic
    /// but expired token is [`Expired`].
    ///
    /// [`Disabled`]: SymmetricKeyAttestationError::Disabled
    /// [`Expired`]: SymmetricKeyAttestationError::Expired
    fn attest(
        &self,
        evidence: &SasEvidence,
        now_unix: u64,
    ) -> Result<AttestedIdentity, SymmetricKeyAttestationError> {
        let SasEvidence {
            registration_id,
            token,
        } = evidence;
        if !token.is_for_registration(&self.id_scope, registration_id) {
            return Err(SymmetricKeyAttestationError::WrongResource);
        }
        if !token.key_name_is_acceptable() {
            return Err(SymmetricKeyAttestationError::KeyName);
        }

        let matched = if let Some(individual) = &self.individual {
            let keys = [
                individual.primary_key.as_str(),
                individual.secondary_key.as_str(),
            ];
            check_keys(token, &keys, now_unix)?;
            if !individual.enabled {
                return Err(SymmetricKeyAttestationError::Disabled);
            }
            EnrollmentRef::Individual(registration_id.clone())
        } else {
            let mut first_enabled = None;
            let mut expired = false;
            for group in &self.groups {
                let derived: Vec<String> = [&group.primary_key, &group.secondary_key]
                    .into_iter()
                    .filter_map(|key| derive_device_key(key, registration_id).ok())
                    .collect();
                let keys: Vec<&str> = derived.iter().map(String::as_str).collect();
                match check_keys(token, &keys, now_unix) {
                    Ok(()) if !group.enabled => {
                        return Err(SymmetricKeyAttestationError::Disabled);
                    }
                    Ok(()) => {
                        first_enabled.get_or_insert(group);
                    }
                    Err(SymmetricKeyAttestationError::Expired) => expired = true,
                    Err(SymmetricKeyAttestationError::Malformed(m)) => {
                        return Err(SymmetricKeyAttestationError::Malformed(m));
                    }
                    Err(_) => {}
                }
            }
            match first_enabled {
                Some(group) => EnrollmentRef::Group(group.group_id.clone()),
                None if expired => return Err(SymmetricKeyAttestationError::Expired),
                None => return Err(SymmetricKeyAttestationError::Unauthorized),
            }
        };

        Ok(AttestedIdentity {
            registration_id: registration_id.clone(),
            mechanism: Mechanism::SymmetricKey,
            matched,
            certificate_info: None,
            signing_certificate_info: None,
            expires_at: Some(token.se),
        })
    }
}

/// [`verify`] with its errors mapped to attestation errors.
fn check_keys(
    token: &SasToken,
    keys: &[&str],
    now_unix: u64,
) -> Result<(), SymmetricKeyAttestationError> {
    match verify(token, keys, now_unix) {
        Ok(_) => Ok(()),
        Err(SasError::Expired) => Err(SymmetricKeyAttestationError::Expired),
        Err(SasError::Malformed(m)) => Err(SymmetricKeyAttestationError::Malformed(m)),
        Err(_) => Err(SymmetricKeyAttestationError::Unauthorized),
    }
}

fn string_to_sign(sr: &str, se: u64) -> String {
    format!("{sr}\n{se}")
}

/// A key's bytes, or `None` if it is not base64 or is empty (an empty HMAC key would let
/// anyone forge a signature).
fn decode_key(key_b64: &str) -> Option<Vec<u8>> {
    STANDARD.decode(key_b64).ok().filter(|k| !k.is_empty())
}

fn url_decode(value: &str) -> Option<String> {
    percent_decode_str(value)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn parse_expiry(se: &str) -> Result<u64, SasError> {
    let canonical = !se.is_empty()
        && se.bytes().all(|b| b.is_ascii_digit())
        && (se == "0" || !se.starts_with('0'));
    if !canonical {
        return Err(SasError::Malformed("se is not a decimal number"));
    }
    se.parse()
        .map_err(|_| SasError::Malformed("se is out of range"))
}

#[cfg(test)]
mod tests;
