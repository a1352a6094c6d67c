//! Console sessions: the credentials a person signed in with, sealed into a cookie.
//!
//! A session is not stored on the server. The cookie holds the credentials themselves (a
//! token, or a policy name and key), a CSRF token and an expiry, sealed with AES-256-GCM under
//! a key derived from the instance's token secret, which every replica shares. Each request
//! re-verifies the credentials, so regenerating a policy's keys, deleting the policy, a
//! token's expiry or rotating the token secret ends every session that used them, on every
//! replica at once. Signing out clears the cookie in the browser.
//!
//! Changes (every method but GET and HEAD) must carry the session's CSRF token in the
//! `X-CSRF-Token` header; the browser gets it from `GET /console/session`, which another
//! origin cannot read. The cookie is also `SameSite=Strict`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use serde::{Deserialize, Serialize};

use crate::auth::{self, AuthorizationPolicy, Caller, Rights};
use crate::db::{Collection, DocumentStore, StoreError};

/// The cookie's name.
pub const COOKIE: &str = "zerotouch_console";
/// The header that carries the CSRF token on changes.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after sign-in.
pub const LIFETIME_SECONDS: u64 = 8 * 3600;
/// Credentials one session may hold (a provisioning one and a hub one, say).
pub const MAX_CREDENTIALS: usize = 4;

/// What the cookie holds, before sealing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    /// The credentials as signed in with.
    pub credentials: Vec<Credential>,
    pub csrf: String,
    /// Unix seconds.
    pub expires: u64,
}

/// One credential a person can sign in with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Credential {
    /// A bearer token from `zerotouch token create`.
    Token { token: String },
    /// A key of an authorization policy, of the provisioning service or of the hub.
    Policy { name: String, key: String },
}

/// Why a sign-in or a session is refused.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Refused(auth::Error),
    #[error("the console session has expired: sign in again")]
    Expired,
    #[error("a change from the console needs the session's X-CSRF-Token header")]
    Csrf,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Ours to fix; for the log.
    #[error("{0}")]
    Internal(String),
}

impl Credential {
    /// Reads what a person pasted: a connection string
    /// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`), or a bearer token.
    pub fn parse(text: &str) -> Result<Credential, SessionError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(SessionError::Malformed(
                "paste a connection string or a token".into(),
            ));
        }
        if text.contains('=') && text.contains(';') {
            let mut name = None;
            let mut key = None;
            for part in text.split(';').filter(|p| !p.trim().is_empty()) {
                let Some((k, v)) = part.split_once('=') else {
                    continue;
                };
                match k.trim().to_ascii_lowercase().as_str() {
                    "sharedaccesskeyname" => name = Some(v.trim().to_string()),
                    "sharedaccesskey" => key = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            return match (name, key) {
                (Some(name), Some(key)) if !name.is_empty() && !key.is_empty() => {
                    Ok(Credential::Policy { name, key })
                }
                _ => Err(SessionError::Malformed(
                    "the connection string needs SharedAccessKeyName and SharedAccessKey".into(),
                )),
            };
        }
        if text.split('.').count() == 3 && !text.contains(char::is_whitespace) {
            return Ok(Credential::Token {
                token: text.to_string(),
            });
        }
        Err(SessionError::Malformed(
            "not a connection string (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…) \
             nor a token from `zerotouch token create`"
                .into(),
        ))
    }
}

/// Checks one credential now: the caller it stands for.
pub fn verify(
    credential: &Credential,
    store: &dyn DocumentStore,
    id_scope: &str,
    token_secret: &str,
    now_unix: u64,
) -> Result<Caller, SessionError> {
    match credential {
        Credential::Token { token } => auth::verify_token(token, token_secret, id_scope, now_unix)
            .map_err(SessionError::Refused),
        Credential::Policy { name, key } => {
            for (collection, prefix) in [
                (Collection::AuthorizationPolicies, "policy"),
                (Collection::HubPolicies, "hub-policy"),
            ] {
                let Some(doc) = store.get(collection, name)? else {
                    continue;
                };
                let policy: AuthorizationPolicy = serde_json::from_value(doc.body)
                    .map_err(|e| SessionError::Store(StoreError::Backend(e.to_string())))?;
                let matches = [&policy.primary_key, &policy.secondary_key]
                    .iter()
                    .any(|k| {
                        k.len() == key.len() && openssl::memcmp::eq(k.as_bytes(), key.as_bytes())
                    });
                if !matches {
                    return Err(SessionError::Refused(auth::Error::InvalidSignature(
                        format!("the key is not a current key of policy {name:?}"),
                    )));
                }
                let rights = Rights::parse(&policy.rights)
                    .map_err(|e| SessionError::Refused(auth::Error::Internal(e)))?;
                return Ok(Caller {
                    principal: format!("{prefix}:{}", policy.key_name),
                    rights,
                });
            }
            Err(SessionError::Refused(auth::Error::InvalidSignature(
                format!("no authorization policy is named {name:?}"),
            )))
        }
    }
}

/// The caller a whole session stands for: its credentials' rights together.
pub fn caller_of(
    session: &Session,
    store: &dyn DocumentStore,
    id_scope: &str,
    token_secret: &str,
    now_unix: u64,
) -> Result<Caller, SessionError> {
    if session.expires <= now_unix {
        return Err(SessionError::Expired);
    }
    let mut principals = Vec::new();
    let mut rights = Rights::default();
    for credential in &session.credentials {
        let caller = verify(credential, store, id_scope, token_secret, now_unix)?;
        principals.push(caller.principal);
        rights = rights.union(caller.rights);
    }
    if principals.is_empty() {
        return Err(SessionError::Expired);
    }
    Ok(Caller {
        principal: format!("console:{}", principals.join("+")),
        rights,
    })
}

fn sealing_key(token_secret: &str) -> Result<LessSafeKey, ring::error::Unspecified> {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            AES_256_GCM.key_len()
        }
    }
    let mut bytes = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, b"zerotouch console session v1")
        .extract(token_secret.as_bytes())
        .expand(&[b"cookie"], Len)?
        .fill(&mut bytes)?;
    Ok(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes)?))
}

/// The cookie value: base64url of nonce and sealed JSON.
pub fn seal(session: &Session, token_secret: &str) -> Result<String, SessionError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::Rng::fill(&mut rand::thread_rng(), &mut nonce);
    let mut data =
        serde_json::to_vec(session).map_err(|e| SessionError::Internal(e.to_string()))?;
    sealing_key(token_secret)
        .and_then(|key| {
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(COOKIE.as_bytes()),
                &mut data,
            )
        })
        .map_err(|_| SessionError::Internal("sealing the session failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Ok(B64URL.encode(out))
}

/// Opens a cookie value; `None` when it was not sealed by this instance (or was altered).
pub fn open(cookie: &str, token_secret: &str) -> Option<Session> {
    let bytes = B64URL.decode(cookie.trim()).ok()?;
    if bytes.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = bytes.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut sealed = sealed.to_vec();
    let plain = sealing_key(token_secret)
        .ok()?
        .open_in_place(nonce, Aad::from(COOKIE.as_bytes()), &mut sealed)
        .ok()?;
    serde_json::from_slice(plain).ok()
}

/// A fresh CSRF token.
pub fn new_csrf() -> String {
    let mut bytes = [0u8; 24];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    B64URL.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            credentials: vec![Credential::Policy {
                name: "owner".into(),
                key: "k".into(),
            }],
            csrf: new_csrf(),
            expires: 100,
        }
    }

    #[test]
    fn a_sealed_session_opens_only_with_its_secret_and_unaltered() {
        let s = session();
        let sealed = seal(&s, "secret-a").unwrap();
        assert_eq!(open(&sealed, "secret-a"), Some(s));
        assert_eq!(open(&sealed, "secret-b"), None);
        let mut bytes = B64URL.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(open(&B64URL.encode(bytes), "secret-a"), None);
        assert_eq!(open("not base64 !", "secret-a"), None);
        assert_eq!(open("", "secret-a"), None);
    }

    #[test]
    fn two_seals_of_one_session_differ() {
        let s = session();
        assert_ne!(seal(&s, "x").unwrap(), seal(&s, "x").unwrap());
        assert_eq!(open(&seal(&s, "x").unwrap(), "x"), Some(s));
    }

    #[test]
    fn credentials_are_read_from_what_people_paste() {
        assert_eq!(
            Credential::parse(" HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=abc= ")
                .unwrap(),
            Credential::Policy {
                name: "iothubowner".into(),
                key: "abc=".into()
            }
        );
        assert_eq!(
            Credential::parse("a.b.c").unwrap(),
            Credential::Token {
                token: "a.b.c".into()
            }
        );
        for bad in ["", "   ", "HostName=h;SharedAccessKey=", "hello", "a.b"] {
            assert!(
                matches!(Credential::parse(bad), Err(SessionError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
