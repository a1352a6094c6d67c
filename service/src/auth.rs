//! Who may call the management API, and with which rights.
//!
//! Two credentials are accepted (spec §4.1): an Azure SAS token signed with an authorization
//! policy's key (`Authorization: SharedAccessSignature sr=…&sig=…&se=…&skn=policy`), and a JWT
//! bearer token minted by `zerotouch token create`, signed with the instance's token secret and
//! carrying the same rights. Bad or expired credentials are 401; a missing right is 403.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use zerotouch_attestation::symmetric_key::{self, SasError, SasToken};

/// Rights, as a small bit set: the DPS rights of dps-protocol §4.1 and the IoT Hub rights of
/// hub-protocol §1.4. A DPS policy holds only DPS rights, a hub policy only hub rights.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u16);

impl Rights {
    pub const SERVICE_CONFIG: Rights = Rights(1);
    pub const ENROLLMENT_READ: Rights = Rights(1 << 1);
    pub const ENROLLMENT_WRITE: Rights = Rights(1 << 2);
    pub const REGISTRATION_STATUS_READ: Rights = Rights(1 << 3);
    pub const REGISTRATION_STATUS_WRITE: Rights = Rights(1 << 4);
    pub const DEVICE_CONNECT: Rights = Rights(1 << 5);
    pub const REGISTRY_READ: Rights = Rights(1 << 6);
    pub const REGISTRY_WRITE: Rights = Rights(1 << 7);
    pub const SERVICE_CONNECT: Rights = Rights(1 << 8);
    /// Every DPS right (what `provisioningserviceowner` holds).
    pub const ALL: Rights = Rights(0b11_1111);
    /// Every IoT Hub right (what `iothubowner` holds).
    pub const HUB_ALL: Rights = Rights((1 << 5) | (1 << 6) | (1 << 7) | (1 << 8));

    const NAMES: [(Rights, &'static str); 9] = [
        (Rights::SERVICE_CONFIG, "ServiceConfig"),
        (Rights::ENROLLMENT_READ, "EnrollmentRead"),
        (Rights::ENROLLMENT_WRITE, "EnrollmentWrite"),
        (Rights::REGISTRATION_STATUS_READ, "RegistrationStatusRead"),
        (Rights::REGISTRATION_STATUS_WRITE, "RegistrationStatusWrite"),
        (Rights::DEVICE_CONNECT, "DeviceConnect"),
        (Rights::REGISTRY_READ, "RegistryRead"),
        (Rights::REGISTRY_WRITE, "RegistryWrite"),
        (Rights::SERVICE_CONNECT, "ServiceConnect"),
    ];

    /// Rights in `self` that are not in `allowed`.
    pub fn outside(self, allowed: Rights) -> Rights {
        Rights(self.0 & !allowed.0)
    }

    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Parses `"EnrollmentRead, EnrollmentWrite"` (the Azure form) or a list split on commas.
    /// Names are case-insensitive; an unknown name is an error that names it.
    pub fn parse(text: &str) -> Result<Rights, String> {
        let mut rights = Rights::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let found = Rights::NAMES
                .iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(part))
                .ok_or_else(|| {
                    format!(
                        "unknown right {part:?}; known: {}",
                        Rights::NAMES.map(|(_, n)| n).join(", ")
                    )
                })?;
            rights = rights.union(found.0);
        }
        Ok(rights)
    }

    pub fn names(self) -> Vec<&'static str> {
        Rights::NAMES
            .iter()
            .filter(|(r, _)| self.contains(*r))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rights({self})")
    }
}

/// An authorization policy as stored (with its keys).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: String,
}

impl fmt::Debug for AuthorizationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationPolicy")
            .field("key_name", &self.key_name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// Why a caller is refused. The HTTP layer maps each kind to its wire code (`http::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No credentials, or credentials that cannot be read.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Expired(String),
    /// The signature does not verify, or the key name is unknown.
    #[error("{0}")]
    InvalidSignature(String),
    /// The credential is for another audience (resource, service).
    #[error("{0}")]
    InvalidAudience(String),
    /// The credential is good but lacks the right.
    #[error("this operation needs the right {0}")]
    InsufficientRights(Rights),
    /// Something broke on our side (a stored policy that does not parse). For the log only.
    #[error("{0}")]
    Internal(String),
}

/// The default policy with every right, created on first start.
pub const OWNER_POLICY: &str = "provisioningserviceowner";

/// Who called, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `policy:NAME` or `token:SUBJECT`.
    pub principal: String,
    pub rights: Rights,
}

impl Caller {
    pub fn require(&self, needed: Rights) -> Result<(), Error> {
        if self.rights.contains(needed) {
            Ok(())
        } else {
            Err(Error::InsufficientRights(needed))
        }
    }
}

/// The credential in an `Authorization` header, not yet verified.
pub enum Credential {
    Sas(SasToken),
    Bearer(String),
}

pub fn parse_authorization(header: Option<&str>) -> Result<Credential, Error> {
    let header = header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            Error::Unauthorized(
                "missing Authorization header: send a SharedAccessSignature or a Bearer token"
                    .into(),
            )
        })?;
    if let Some(token) = strip_prefix_ignore_case(header, "Bearer ") {
        return Ok(Credential::Bearer(token.trim().to_string()));
    }
    if strip_prefix_ignore_case(header, "SharedAccessSignature ").is_some() {
        return SasToken::parse(header)
            .map(Credential::Sas)
            .map_err(|e| Error::Unauthorized(format!("malformed SAS token: {e}")));
    }
    Err(Error::Unauthorized(
        "unsupported Authorization scheme: use SharedAccessSignature or Bearer".into(),
    ))
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Checks a SAS token against the policy it names. `hostnames` are the names this service
/// answers to; the token's audience (`sr`) must be one of them (any port), optionally followed
/// by a path that prefixes `request_path` segment by segment.
pub fn verify_sas(
    token: &SasToken,
    policy: Option<&AuthorizationPolicy>,
    hostnames: &[String],
    request_path: &str,
    now_unix: u64,
) -> Result<Caller, Error> {
    let policy = policy.ok_or_else(|| {
        Error::InvalidSignature("the SAS token names no known authorization policy (skn)".into())
    })?;
    symmetric_key::verify(
        token,
        &[policy.primary_key.as_str(), policy.secondary_key.as_str()],
        now_unix,
    )
    .map_err(|e| match e {
        SasError::Expired => Error::Expired("the SAS token has expired".into()),
        _ => Error::InvalidSignature("the SAS token signature does not verify".into()),
    })?;
    let resource = token
        .resource_decoded()
        .map_err(|_| Error::InvalidAudience("sr is not URL-encoded text".into()))?;
    check_audience(&resource, hostnames, request_path)?;
    let rights = Rights::parse(&policy.rights).map_err(Error::Internal)?;
    Ok(Caller {
        principal: format!("policy:{}", policy.key_name),
        rights,
    })
}

fn check_audience(resource: &str, hostnames: &[String], request_path: &str) -> Result<(), Error> {
    let resource = resource
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (authority, path) = match resource.find('/') {
        Some(i) => (&resource[..i], &resource[i..]),
        None => (resource, ""),
    };
    let host = strip_port(authority);
    let known = hostnames.iter().any(|h| {
        h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(host.trim_matches(['[', ']']))
    });
    if !known {
        return Err(Error::InvalidAudience(format!(
            "the SAS token is for {authority:?}, which is not this service"
        )));
    }
    let path = path.trim_end_matches('/');
    if !path.is_empty() {
        let request = request_path.trim_end_matches('/');
        let matches = request.len() >= path.len()
            && request[..path.len()].eq_ignore_ascii_case(path)
            && (request.len() == path.len() || request.as_bytes()[path.len()] == b'/');
        if !matches {
            return Err(Error::InvalidAudience(format!(
                "the SAS token is scoped to {path:?}"
            )));
        }
    }
    Ok(())
}

/// `host:port` → `host`; `[::1]:8443` → `[::1]`; a bare IPv6 literal stays whole.
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

/// Claims of our bearer tokens.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub rights: Vec<String>,
}

pub const TOKEN_AUDIENCE: &str = "zerotouch-management";

pub fn token_issuer(id_scope: &str) -> String {
    format!("zerotouch/{id_scope}")
}

/// The HS256 secret as stored: base64 of 32 random bytes.
pub fn generate_token_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    B64.encode(bytes)
}

pub fn mint_token(
    secret_b64: &str,
    id_scope: &str,
    subject: &str,
    rights: Rights,
    now_unix: u64,
    ttl_seconds: u64,
) -> Result<String, String> {
    if rights == Rights::default() {
        return Err("a token needs at least one right".into());
    }
    let secret = B64
        .decode(secret_b64)
        .map_err(|_| "the token secret is not base64".to_string())?;
    let claims = Claims {
        sub: subject.to_string(),
        iss: token_issuer(id_scope),
        aud: TOKEN_AUDIENCE.to_string(),
        iat: now_unix,
        exp: now_unix.saturating_add(ttl_seconds),
        rights: rights.names().into_iter().map(String::from).collect(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret),
    )
    .map_err(|e| e.to_string())
}

pub fn verify_token(
    token: &str,
    secret_b64: &str,
    id_scope: &str,
    now_unix: u64,
) -> Result<Caller, Error> {
    let secret = B64
        .decode(secret_b64)
        .map_err(|e| Error::Internal(format!("the token secret is not base64: {e}")))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[TOKEN_AUDIENCE]);
    validation.set_issuer(&[token_issuer(id_scope)]);
    validation.leeway = 0;
    // We check expiry ourselves against the caller-supplied clock, so tests can pin time.
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&secret), &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                        Error::InvalidAudience(
                            "the bearer token was issued for another service".into(),
                        )
                    }
                    ErrorKind::InvalidSignature => {
                        Error::InvalidSignature("the bearer token signature does not verify".into())
                    }
                    _ => Error::Unauthorized("malformed bearer token".into()),
                }
            })?;
    if data.claims.exp <= now_unix {
        return Err(Error::Expired("the bearer token has expired".into()));
    }
    let rights = Rights::parse(&data.claims.rights.join(",")).map_err(Error::Unauthorized)?;
    Ok(Caller {
        principal: format!("token:{}", data.claims.sub),
        rights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kind of refusal, named as its wire code is (the mapping is `http::error`'s).
    fn code(error: Error) -> &'static str {
        match error {
            Error::Unauthorized(_) => "Unauthorized",
            Error::Expired(_) => "TokenExpired",
            Error::InvalidSignature(_) => "InvalidSignature",
            Error::InvalidAudience(_) => "InvalidAudience",
            Error::InsufficientRights(_) => "InsufficientRights",
            Error::Internal(_) => "Internal",
        }
    }

    fn policy(rights: &str) -> AuthorizationPolicy {
        AuthorizationPolicy {
            key_name: "reader".into(),
            primary_key: symmetric_key::generate_key().unwrap(),
            secondary_key: symmetric_key::generate_key().unwrap(),
            rights: rights.into(),
        }
    }

    fn hosts() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    fn sas(resource: &str, key: &str, se: u64) -> SasToken {
        let text = symmetric_key::sign(resource, key, se, Some("reader")).unwrap();
        match parse_authorization(Some(&text)).unwrap() {
            Credential::Sas(t) => t,
            Credential::Bearer(_) => unreachable!(),
        }
    }

    #[test]
    fn rights_parse_round_trip() {
        let r = Rights::parse("EnrollmentRead, enrollmentwrite").unwrap();
        assert!(r.contains(Rights::ENROLLMENT_READ));
        assert!(r.contains(Rights::ENROLLMENT_WRITE));
        assert!(!r.contains(Rights::SERVICE_CONFIG));
        assert_eq!(r.to_string(), "EnrollmentRead, EnrollmentWrite");
        assert!(
            Rights::parse("EnrollmentReed")
                .unwrap_err()
                .contains("EnrollmentReed")
        );
        assert_eq!(
            Rights::parse(&Rights::ALL.to_string()).unwrap(),
            Rights::ALL
        );
    }

    #[test]
    fn sas_with_port_in_audience_and_secondary_key() {
        let p = policy("EnrollmentRead");
        let token = sas("localhost:8443", &p.secondary_key, 2_000_000_000);
        let caller =
            verify_sas(&token, Some(&p), &hosts(), "/enrollments/x", 1_700_000_000).unwrap();
        assert_eq!(caller.principal, "policy:reader");
        assert!(caller.require(Rights::ENROLLMENT_READ).is_ok());
        let err = caller.require(Rights::ENROLLMENT_WRITE).unwrap_err();
        assert!(matches!(err, Error::InsufficientRights(_)), "{err:?}");
    }

    #[test]
    fn sas_failures_have_their_codes() {
        let p = policy("EnrollmentRead");
        let expired = sas("localhost", &p.primary_key, 1_000);
        assert_eq!(
            verify_sas(&expired, Some(&p), &hosts(), "/", 1_700_000_000)
                .map_err(code)
                .unwrap_err(),
            "TokenExpired"
        );
        let other_key = sas(
            "localhost",
            &symmetric_key::generate_key().unwrap(),
            2_000_000_000,
        );
        assert_eq!(
            verify_sas(&other_key, Some(&p), &hosts(), "/", 1_700_000_000)
                .map_err(code)
                .unwrap_err(),
            "InvalidSignature"
        );
        assert_eq!(
            verify_sas(&other_key, None, &hosts(), "/", 1_700_000_000)
                .map_err(code)
                .unwrap_err(),
            "InvalidSignature"
        );
        let elsewhere = sas("evil.example.com", &p.primary_key, 2_000_000_000);
        assert_eq!(
            verify_sas(&elsewhere, Some(&p), &hosts(), "/", 1_700_000_000)
                .map_err(code)
                .unwrap_err(),
            "InvalidAudience"
        );
    }

    #[test]
    fn sas_path_scope_is_segment_prefix() {
        let p = policy("EnrollmentRead");
        let scoped = sas("localhost/enrollments", &p.primary_key, 2_000_000_000);
        assert!(verify_sas(&scoped, Some(&p), &hosts(), "/enrollments/dev1", 1).is_ok());
        assert!(verify_sas(&scoped, Some(&p), &hosts(), "/enrollmentGroups/g", 1).is_err());
        let ipv6 = sas("[::1]:8443", &p.primary_key, 2_000_000_000);
        assert!(verify_sas(&ipv6, Some(&p), &hosts(), "/", 1).is_ok());
    }

    #[test]
    fn authorization_header_forms() {
        assert_eq!(
            parse_authorization(None).err().map(code),
            Some("Unauthorized")
        );
        assert_eq!(
            parse_authorization(Some("Basic abc")).err().map(code),
            Some("Unauthorized")
        );
        assert_eq!(
            parse_authorization(Some("SharedAccessSignature garbage"))
                .err()
                .map(code),
            Some("Unauthorized")
        );
        assert!(matches!(
            parse_authorization(Some("bearer abc")),
            Ok(Credential::Bearer(t)) if t == "abc"
        ));
    }

    #[test]
    fn bearer_tokens_carry_rights_and_expire() {
        let secret = generate_token_secret();
        let now = 1_700_000_000;
        let rights = Rights::ENROLLMENT_READ.union(Rights::REGISTRATION_STATUS_READ);
        let token = mint_token(&secret, "0ne00000001", "ci", rights, now, 60).unwrap();
        let caller = verify_token(&token, &secret, "0ne00000001", now + 59).unwrap();
        assert_eq!(caller.rights, rights);
        assert_eq!(caller.principal, "token:ci");
        assert_eq!(
            verify_token(&token, &secret, "0ne00000001", now + 60)
                .map_err(code)
                .unwrap_err(),
            "TokenExpired"
        );
        assert_eq!(
            verify_token(&token, &generate_token_secret(), "0ne00000001", now)
                .map_err(code)
                .unwrap_err(),
            "InvalidSignature"
        );
        assert_eq!(
            verify_token(&token, &secret, "0ne0000000f", now)
                .map_err(code)
                .unwrap_err(),
            "InvalidAudience"
        );
        assert_eq!(
            verify_token("not.a.jwt", &secret, "0ne00000001", now)
                .map_err(code)
                .unwrap_err(),
            "Unauthorized"
        );
        assert!(mint_token(&secret, "0ne00000001", "x", Rights::default(), now, 60).is_err());
    }
}
