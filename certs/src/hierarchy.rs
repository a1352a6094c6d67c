//! The CA hierarchy (root → intermediate) and issuance from the intermediate.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm, SigningKey,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;

use crate::device::{self, IssuanceProfile, IssuedDeviceCertificate};
use crate::hostname::{self, Host};
use crate::pkcs11::Pkcs11Key;
use crate::{Error, SecretPem, pem};

/// Root validity: 20 years (with leap days).
const ROOT_VALIDITY: Duration = Duration::days(20 * 365 + 5);
/// Intermediate validity: 10 years (with leap days).
const INTERMEDIATE_VALIDITY: Duration = Duration::days(10 * 365 + 3);
/// `notBefore` is set this far in the past so that clients whose clock is slightly behind
/// accept a certificate issued a moment ago.
const BACKDATE: Duration = Duration::minutes(5);
/// RFC 5280 upper bound for a CommonName.
const MAX_COMMON_NAME: usize = 64;

/// The CA hierarchy Zerotouch issues from: a root (whose key may be kept offline) and an
/// intermediate that signs everything.
///
/// Build one with [`CaHierarchy::generate`] on first start and persist the PEM accessors;
/// rebuild it with [`CaHierarchy::from_pem`] afterwards.
pub struct CaHierarchy {
    root_cert_pem: String,
    pub(crate) root_der: Vec<u8>,
    root_key: Option<SecretPem>,
    intermediate_cert_pem: String,
    pub(crate) intermediate_der: Vec<u8>,
    /// Empty when the key is in a PKCS#11 token (`token_key`).
    intermediate_key: SecretPem,
    /// The intermediate key in a PKCS#11 token, when it is there instead of in memory.
    token_key: Option<Pkcs11Key>,
    intermediate_not_after: OffsetDateTime,
    /// Earlier intermediates (PEM, newest first) that are still trusted during a rotation's
    /// overlap: in the trust bundle, never used to sign.
    previous_intermediates: Vec<String>,
    /// The intermediate as rcgen's signer: certificates and CRLs are signed through it.
    pub(crate) issuer: Issuer<'static, CaKey>,
}

/// A CA signing key: in memory, or in a PKCS#11 token. Both are rcgen signers, so
/// certificates, CRLs and OCSP responses are signed the same way with either.
pub(crate) enum CaKey {
    Software(Box<KeyPair>),
    Token(Pkcs11Key),
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::Software(key) => key.der_bytes(),
            CaKey::Token(key) => key.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            CaKey::Software(key) => PublicKeyData::algorithm(key.as_ref()),
            CaKey::Token(key) => key.algorithm(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::Software(key) => key.sign(msg),
            CaKey::Token(key) => key.sign(msg),
        }
    }
}

/// A certificate freshly issued together with its new private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The leaf certificate alone, PEM.
    pub certificate_pem: String,
    /// The leaf followed by the intermediate, PEM: what a TLS server presents.
    pub chain_pem: String,
    /// The leaf's new private key (PKCS#8 PEM).
    pub private_key: SecretPem,
}

impl CaHierarchy {
    /// Generates a new P-256 root and P-256 intermediate.
    ///
    /// Root: self-signed, CA with pathlen 1, key usage keyCertSign + cRLSign, valid 20 years.
    /// Intermediate: signed by the root, CA with pathlen 0, key usage keyCertSign + cRLSign +
    /// digitalSignature, valid 10 years. The subjects are `CN=Zerotouch Root CA ({name})` and
    /// `CN=Zerotouch Intermediate CA ({name})`; serials are random 16-byte positive integers.
    pub fn generate(name: &str) -> Result<CaHierarchy, Error> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let now = OffsetDateTime::now_utc();

        let root_key = new_key()?;
        let mut root = CertificateParams::default();
        root.distinguished_name = common_name(&format!("Zerotouch Root CA ({name})"));
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.not_before = now - BACKDATE;
        root.not_after = later(now, ROOT_VALIDITY)?;
        root.serial_number = Some(random_serial()?);
        let root_cert_pem = pem::encode(
            "CERTIFICATE",
            root.self_signed(&root_key).map_err(generation)?.der(),
        );
        let root_key_pem = SecretPem::new(root_key.serialize_pem());
        let root_issuer = Issuer::new(root, root_key);

        let (intermediate_cert_pem, intermediate_key_pem) =
            new_intermediate(&root_issuer, name, now, later(now, INTERMEDIATE_VALIDITY)?)?;

        // Going through `from_pem` means a fresh hierarchy and a restored one are built (and
        // checked) by the same code.
        Self::from_pem(
            &root_cert_pem,
            Some(&root_key_pem),
            &intermediate_cert_pem,
            &intermediate_key_pem,
        )
    }

    /// Rebuilds a hierarchy from stored PEM.
    ///
    /// The root key may be absent (an offline root): issuance only needs the intermediate.
    /// Checks that both certificates are CAs, that each given key belongs to its certificate,
    /// and that the intermediate is signed by the root. Each PEM certificate input must hold
    /// exactly one certificate; keys are PKCS#8 (`PRIVATE KEY`), SEC1 or PKCS#1 PEM.
    /// The stored certificate PEM is re-encoded canonically (64-column lines, LF).
    pub fn from_pem(
        root_cert: &str,
        root_key: Option<&SecretPem>,
        intermediate_cert: &str,
        intermediate_key: &SecretPem,
    ) -> Result<CaHierarchy, Error> {
        let key = parse_key(intermediate_key, "intermediate key")?;
        Self::build(
            root_cert,
            root_key,
            intermediate_cert,
            CaKey::Software(Box::new(key)),
            intermediate_key.clone(),
        )
    }

    /// Rebuilds a hierarchy like [`CaHierarchy::from_pem`], with the intermediate's private
    /// key in a PKCS#11 token: the key signs in the token and never enters this process.
    /// Checks that the token key's public key is the intermediate certificate's.
    ///
    /// Such a hierarchy issues certificates, signs CRLs and OCSP responses as usual;
    /// [`CaHierarchy::intermediate_key_pem`] is empty.
    pub fn from_pem_with_token_key(
        root_cert: &str,
        root_key: Option<&SecretPem>,
        intermediate_cert: &str,
        intermediate_key: Pkcs11Key,
    ) -> Result<CaHierarchy, Error> {
        Self::build(
            root_cert,
            root_key,
            intermediate_cert,
            CaKey::Token(intermediate_key),
            SecretPem::new(String::new()),
        )
    }

    fn build(
        root_cert: &str,
        root_key: Option<&SecretPem>,
        intermediate_cert: &str,
        key: CaKey,
        intermediate_key: SecretPem,
    ) -> Result<CaHierarchy, Error> {
        let root_der = pem::single_certificate(root_cert, "root certificate")?;
        let root = pem::parse_der(&root_der, "root certificate")?;
        check_ca(&root, "root certificate")?;
        if let Some(key) = root_key {
            let key = parse_key(key, "root key")?;
            check_key_matches(&key, &root, "root")?;
        }

        let intermediate_der =
            pem::single_certificate(intermediate_cert, "intermediate certificate")?;
        let intermediate = pem::parse_der(&intermediate_der, "intermediate certificate")?;
        check_ca(&intermediate, "intermediate certificate")?;
        check_key_matches(&key, &intermediate, "intermediate")?;
        let token_key = match &key {
            CaKey::Token(key) => Some(key.clone()),
            CaKey::Software(_) => None,
        };

        if intermediate.issuer().as_raw() != root.subject().as_raw()
            || intermediate
                .verify_signature(Some(root.public_key()))
                .is_err()
        {
            return Err(Error::NotSignedByRoot);
        }

        let intermediate_not_after = intermediate.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&intermediate_der.as_slice().into(), key)
            .map_err(generation)?;
        Ok(CaHierarchy {
            previous_intermediates: Vec::new(),
            root_cert_pem: pem::encode("CERTIFICATE", &root_der),
            root_der,
            root_key: root_key.cloned(),
            intermediate_cert_pem: pem::encode("CERTIFICATE", &intermediate_der),
            intermediate_der,
            intermediate_key,
            token_key,
            intermediate_not_after,
            issuer,
        })
    }

    /// The root certificate, PEM.
    pub fn root_cert_pem(&self) -> &str {
        &self.root_cert_pem
    }

    /// The root private key, if this hierarchy holds it.
    pub fn root_key_pem(&self) -> Option<&SecretPem> {
        self.root_key.as_ref()
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_cert_pem(&self) -> &str {
        &self.intermediate_cert_pem
    }

    /// The intermediate private key. Empty when the key is in a PKCS#11 token (see
    /// [`CaHierarchy::from_pem_with_token_key`]): it never leaves the token.
    pub fn intermediate_key_pem(&self) -> &SecretPem {
        &self.intermediate_key
    }

    /// The intermediate key in its token, if it is in one.
    pub(crate) fn token_key(&self) -> Option<&Pkcs11Key> {
        self.token_key.as_ref()
    }

    /// The trust bundle devices and clients install: root, the current intermediate, then
    /// the previous intermediates still trusted (newest first), PEM.
    pub fn trust_bundle_pem(&self) -> String {
        let mut bundle = format!("{}{}", self.root_cert_pem, self.intermediate_cert_pem);
        for previous in &self.previous_intermediates {
            bundle.push_str(previous);
        }
        bundle
    }

    /// Earlier intermediates still trusted (PEM, newest first); see
    /// [`CaHierarchy::with_previous_intermediates`].
    pub fn previous_intermediate_pems(&self) -> &[String] {
        &self.previous_intermediates
    }

    /// Adds earlier intermediates that stay trusted during a rotation's overlap: they go into
    /// [`CaHierarchy::trust_bundle_pem`] and never sign. Each PEM input must hold exactly one
    /// CA certificate signed by this hierarchy's root; the current intermediate itself and
    /// duplicates are dropped.
    pub fn with_previous_intermediates(mut self, pems: &[String]) -> Result<CaHierarchy, Error> {
        let root = pem::parse_der(&self.root_der, "root certificate")?;
        for text in pems {
            let der = pem::single_certificate(text, "previous intermediate certificate")?;
            let cert = pem::parse_der(&der, "previous intermediate certificate")?;
            check_ca(&cert, "previous intermediate certificate")?;
            if cert.issuer().as_raw() != root.subject().as_raw()
                || cert.verify_signature(Some(root.public_key())).is_err()
            {
                return Err(Error::NotSignedByRoot);
            }
            let canonical = pem::encode("CERTIFICATE", &der);
            if der != self.intermediate_der && !self.previous_intermediates.contains(&canonical) {
                self.previous_intermediates.push(canonical);
            }
        }
        Ok(self)
    }

    /// A new intermediate signed by the root, `CN=Zerotouch Intermediate CA ({name})`, with a
    /// new P-256 key; the hierarchy returned issues from it and keeps the current intermediate
    /// (and the earlier ones) as previous intermediates. Needs the root key
    /// ([`Error::RootKeyMissing`] without it). The new intermediate is valid for 10 years, or
    /// until the root expires if that is sooner.
    pub fn rotate_intermediate(&self, name: &str) -> Result<CaHierarchy, Error> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let root_key_pem = self.root_key.as_ref().ok_or(Error::RootKeyMissing)?;
        let root_key = parse_key(root_key_pem, "root key")?;
        let root = pem::parse_der(&self.root_der, "root certificate")?;
        let root_not_after = root.validity().not_after.to_datetime();
        let root_issuer = Issuer::from_ca_cert_der(&self.root_der.as_slice().into(), root_key)
            .map_err(generation)?;
        let now = OffsetDateTime::now_utc();
        let not_after = later(now, INTERMEDIATE_VALIDITY)?.min(root_not_after);
        if not_after <= now {
            return Err(Error::Generation("the root certificate has expired".into()));
        }
        let (cert_pem, key_pem) = new_intermediate(&root_issuer, name, now, not_after)?;
        let mut previous = vec![self.intermediate_cert_pem.clone()];
        previous.extend(self.previous_intermediates.iter().cloned());
        CaHierarchy::from_pem(&self.root_cert_pem, Some(root_key_pem), &cert_pem, &key_pem)?
            .with_previous_intermediates(&previous)
    }

    /// Issues a TLS server certificate signed by the intermediate.
    ///
    /// IP literals (`127.0.0.1`, `::1`) become IP SANs, everything else must be a DNS name
    /// (see [`Error::InvalidHostname`]); duplicates are dropped. CN = the first hostname (left
    /// out if longer than 64 characters; the SANs are what clients check). EKU serverAuth, key
    /// usage digitalSignature + keyEncipherment, basicConstraints CA:FALSE, a new P-256 key,
    /// valid from now (minus five minutes of clock-skew allowance) for `days` days, which must
    /// not reach past the intermediate's own expiry.
    pub fn issue_server_certificate(
        &self,
        hostnames: &[String],
        days: u32,
    ) -> Result<IssuedCertificate, Error> {
        let first = hostnames.first().ok_or(Error::NoHostnames)?;
        let mut sans: Vec<SanType> = Vec::with_capacity(hostnames.len());
        let mut seen: Vec<Host> = Vec::with_capacity(hostnames.len());
        for name in hostnames {
            let host = hostname::parse(name)?;
            if seen.iter().any(|h| same_host(h, &host)) {
                continue;
            }
            sans.push(match &host {
                Host::Ip(ip) => SanType::IpAddress(*ip),
                Host::Dns(dns) => SanType::DnsName(
                    dns.as_str()
                        .try_into()
                        .map_err(|_| Error::InvalidHostname(dns.clone()))?,
                ),
            });
            seen.push(host);
        }
        if days == 0 {
            return Err(Error::InvalidValidity);
        }
        let now = OffsetDateTime::now_utc();
        let not_after = now
            .checked_add(Duration::days(i64::from(days)))
            .filter(|end| *end <= self.intermediate_not_after)
            .ok_or(Error::ValidityBeyondIssuer { days })?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if first.len() <= MAX_COMMON_NAME {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);

        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generation)?;
        let certificate_pem = pem::encode("CERTIFICATE", cert.der());
        Ok(IssuedCertificate {
            chain_pem: format!("{certificate_pem}{}", self.intermediate_cert_pem),
            certificate_pem,
            private_key: SecretPem::new(key.serialize_pem()),
        })
    }

    /// Issues a device certificate for the public key in a PKCS#10 CSR (DPS `csr`, DER).
    ///
    /// Checks: the CSR parses (nothing after it), its signature verifies with its own key
    /// (RSA 2048–8192 bits with PKCS#1 v1.5, or PSS with salt length = digest length, over
    /// SHA-256/384/512; ECDSA P-256/P-384; Ed25519; SHA-1 is refused as [`Error::InvalidCsr`],
    /// a key ring cannot check, such as RSA-1024, fails as [`Error::CsrSignatureInvalid`]) and
    /// its subject has exactly one CN, equal to `expected_cn` (case-sensitive). Everything
    /// else in the CSR, requested extensions included, is ignored; openssl CSRs with a
    /// subjectKeyIdentifier request are fine.
    ///
    /// Profile: subject `CN={expected_cn}` only, no SAN, basicConstraints CA:FALSE, key usage
    /// digitalSignature plus keyAgreement (EC) or keyEncipherment (RSA), EKU clientAuth,
    /// authority key identifier, a 16-byte random positive serial, valid from `now_unix` minus
    /// five minutes to `now_unix` plus `validity_days` days, signed by the intermediate.
    /// A certificate that would outlive the intermediate is refused
    /// ([`Error::ValidityBeyondIssuer`]), not shortened.
    pub fn sign_device_csr(
        &self,
        csr_der: &[u8],
        expected_cn: &str,
        validity_days: u32,
        now_unix: i64,
    ) -> Result<IssuedDeviceCertificate, Error> {
        self.sign_device_csr_with(
            csr_der,
            expected_cn,
            &IssuanceProfile::new(validity_days),
            now_unix,
        )
    }

    /// Issues a device certificate like [`CaHierarchy::sign_device_csr`], with the validity
    /// and the revocation URLs of `profile`.
    ///
    /// The certificate gets, when the profile has them: a cRLDistributionPoints extension
    /// with the CRL URL (one distribution point, one URI), and an authorityInfoAccess
    /// extension with an id-ad-ocsp entry for the OCSP responder and an id-ad-caIssuers entry
    /// for the issuer certificate URL (in that order). Both are non-critical. The CSR checks,
    /// the subject (`CN={registration_id}`) and everything else are as for `sign_device_csr`.
    pub fn sign_device_csr_with(
        &self,
        csr_der: &[u8],
        registration_id: &str,
        profile: &IssuanceProfile,
        now_unix: i64,
    ) -> Result<IssuedDeviceCertificate, Error> {
        let expected_cn = registration_id;
        let validity_days = profile.validity_days;
        let csr = device::verify_csr(csr_der, expected_cn)?;
        if validity_days == 0 {
            return Err(Error::InvalidValidity);
        }
        let now = OffsetDateTime::from_unix_timestamp(now_unix)
            .map_err(|_| Error::InvalidTime(now_unix))?;
        let not_before = now
            .checked_sub(BACKDATE)
            .ok_or(Error::InvalidTime(now_unix))?;
        let not_after = now
            .checked_add(Duration::days(i64::from(validity_days)))
            .filter(|end| *end <= self.intermediate_not_after)
            .ok_or(Error::ValidityBeyondIssuer {
                days: validity_days,
            })?;

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(expected_cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = csr.key_usages;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.crl_distribution_points = profile
            .crl_distribution_point
            .iter()
            .map(|url| rcgen::CrlDistributionPoint {
                uris: vec![url.as_str().to_owned()],
            })
            .collect();
        params
            .custom_extensions
            .extend(profile.authority_info_access());
        let serial = random_serial()?;
        let serial_hex = hex_upper(serial.as_ref());
        params.serial_number = Some(serial);

        let cert = params
            .signed_by(&csr.spki, &self.issuer)
            .map_err(generation)?;
        let certificate_der = cert.der().to_vec();
        Ok(IssuedDeviceCertificate {
            certificate_pem: pem::encode("CERTIFICATE", &certificate_der),
            chain_der: vec![
                certificate_der.clone(),
                self.intermediate_der.clone(),
                self.root_der.clone(),
            ],
            certificate_der,
            serial_hex,
            not_before_unix: not_before.unix_timestamp(),
            not_after_unix: not_after.unix_timestamp(),
            subject: format!("CN={expected_cn}"),
        })
    }

    /// Whether the first certificate in `cert_pem` was issued by this hierarchy's intermediate
    /// (issuer name matches and the signature verifies). Lets the service notice that a stored
    /// server certificate belongs to an older CA and must be re-issued.
    pub fn is_issuer_of(&self, cert_pem: &str) -> Result<bool, Error> {
        let der = pem::first_certificate(cert_pem, "certificate")?;
        let cert = pem::parse_der(&der, "certificate")?;
        let intermediate = pem::parse_der(&self.intermediate_der, "intermediate certificate")?;
        Ok(cert.issuer().as_raw() == intermediate.subject().as_raw()
            && cert
                .verify_signature(Some(intermediate.public_key()))
                .is_ok())
    }
}

impl fmt::Debug for CaHierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaHierarchy")
            .field("root_key", &self.root_key)
            .field("intermediate_key", &self.intermediate_key)
            .field("token_key", &self.token_key)
            .field("intermediate_not_after", &self.intermediate_not_after)
            .finish_non_exhaustive()
    }
}

/// An intermediate CA certificate (pathlen 0, keyCertSign + cRLSign + digitalSignature, AKI,
/// random serial) for a new P-256 key, signed by `root_issuer`. Returns (cert PEM, key).
fn new_intermediate<S: rcgen::SigningKey>(
    root_issuer: &Issuer<'_, S>,
    name: &str,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, SecretPem), Error> {
    let intermediate_key = new_key()?;
    let mut intermediate = CertificateParams::default();
    intermediate.distinguished_name = common_name(&format!("Zerotouch Intermediate CA ({name})"));
    intermediate.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    intermediate.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    intermediate.not_before = now - BACKDATE;
    intermediate.not_after = not_after;
    intermediate.serial_number = Some(random_serial()?);
    intermediate.use_authority_key_identifier_extension = true;
    let cert = intermediate
        .signed_by(&intermediate_key, root_issuer)
        .map_err(generation)?;
    Ok((
        pem::encode("CERTIFICATE", cert.der()),
        SecretPem::new(intermediate_key.serialize_pem()),
    ))
}

fn generation(e: rcgen::Error) -> Error {
    Error::Generation(e.to_string())
}

/// `now + d`, as an error instead of a panic if the clock is absurd.
fn later(now: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, Error> {
    now.checked_add(d)
        .ok_or_else(|| Error::Generation("validity end is out of range".into()))
}

fn new_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generation)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// 16 random bytes with the top bit clear (positive) and the next bit set (so the DER
/// INTEGER is always exactly 16 bytes long).
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Generation("the system random number generator failed".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn parse_key(key: &SecretPem, what: &'static str) -> Result<KeyPair, Error> {
    KeyPair::from_pem(key.expose()).map_err(|e| Error::InvalidPem {
        what,
        reason: e.to_string(),
    })
}

fn check_key_matches(
    key: &impl PublicKeyData,
    cert: &X509Certificate<'_>,
    what: &'static str,
) -> Result<(), Error> {
    if key.subject_public_key_info() == cert.public_key().raw {
        Ok(())
    } else {
        Err(Error::KeyMismatch { what })
    }
}

/// A CA certificate has `basicConstraints CA:TRUE` and, if it restricts key usage at all,
/// allows keyCertSign.
fn check_ca(cert: &X509Certificate<'_>, what: &'static str) -> Result<(), Error> {
    let can_sign = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    if cert.is_ca() && can_sign {
        Ok(())
    } else {
        Err(Error::NotACa { what })
    }
}

fn same_host(a: &Host, b: &Host) -> bool {
    match (a, b) {
        (Host::Ip(a), Host::Ip(b)) => a == b,
        (Host::Dns(a), Host::Dns(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
