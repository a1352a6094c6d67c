//! Continuation tokens for [`list`](super::DocumentStore::list).
//!
//! A token is base64url (no padding) of a version tag and the lower-cased id of the last item
//! returned; the next page starts after that id. Tokens are opaque to callers but not secret:
//! a forged one can only move the starting point of a listing.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::StoreError;

const PREFIX: &str = "v1:";
/// Longer tokens are rejected before decoding; ids are far shorter than this.
const MAX_TOKEN_LEN: usize = 4096;

pub(crate) fn encode(last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PREFIX}{last_key}"))
}

/// The id key after which the next page starts.
pub(crate) fn decode(token: &str) -> Result<String, StoreError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(StoreError::BadContinuation);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| StoreError::BadContinuation)?;
    let text = String::from_utf8(bytes).map_err(|_| StoreError::BadContinuation)?;
    text.strip_prefix(PREFIX)
        .map(str::to_owned)
        .ok_or(StoreError::BadContinuation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for key in ["", "device-1", "ünïcödé", "a:b/c?d"] {
            let token = encode(key);
            assert!(
                token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            );
            assert_eq!(decode(&token).unwrap(), key);
        }
    }

    #[test]
    fn garbage_is_rejected() {
        let long = "A".repeat(MAX_TOKEN_LEN + 4);
        let not_utf8 = URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x00]);
        let no_prefix = URL_SAFE_NO_PAD.encode("device-1");
        for token in ["", "!!!", "a", "====", &long, &not_utf8, &no_prefix] {
            assert_eq!(decode(token), Err(StoreError::BadContinuation), "{token:?}");
        }
    }
}
