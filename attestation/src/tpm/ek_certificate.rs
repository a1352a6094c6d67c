//! Endorsement-key certificates: what DPS does not check. A TPM maker certifies each EK; a chain
//! from the device's EK certificate to a trusted maker root proves the key lives in a genuine
//! TPM, so a service can admit TPMs it was never told about one by one (TPM groups).

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::TpmPublic;
use crate::x509::Certificate;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EkCertificateError {
    #[error("the EK certificate does not parse")]
    Malformed,
    #[error("the EK certificate is for another key than the endorsement key")]
    KeyMismatch,
    #[error("the EK certificate is expired or not yet valid")]
    Validity,
    #[error("the EK certificate does not chain to a trusted TPM manufacturer root")]
    UntrustedRoot,
}

/// Whether the certificate's RSA public key is the EK (modulus and exponent).
pub fn certifies(certificate_der: &[u8], ek: &TpmPublic) -> Result<bool, EkCertificateError> {
    let (_, cert) =
        X509Certificate::from_der(certificate_der).map_err(|_| EkCertificateError::Malformed)?;
    let Ok(PublicKey::RSA(rsa)) = cert.public_key().parsed() else {
        return Ok(false);
    };
    let strip = |b: &[u8]| -> Vec<u8> {
        let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[first..].to_vec()
    };
    let exponent = rsa
        .exponent
        .iter()
        .skip_while(|b| **b == 0)
        .try_fold(0u64, |acc, b| {
            acc.checked_mul(256).map(|a| a + u64::from(*b))
        });
    Ok(strip(rsa.modulus) == strip(&ek.modulus) && exponent == Some(u64::from(ek.exponent())))
}

/// Checks an EK certificate: it certifies `ek`, is valid at `now_unix`, and chains through
/// `intermediates` to one of `roots` (each link's issuer name and signature checked).
pub fn verify(
    certificate_der: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    ek: &TpmPublic,
    now_unix: i64,
) -> Result<(), EkCertificateError> {
    if !certifies(certificate_der, ek)? {
        return Err(EkCertificateError::KeyMismatch);
    }
    let leaf = Certificate::from_der(certificate_der).map_err(|_| EkCertificateError::Malformed)?;
    if !leaf.is_valid_at(now_unix) {
        return Err(EkCertificateError::Validity);
    }
    let anchors: Vec<Certificate> = roots
        .iter()
        .filter_map(|d| Certificate::from_der(d).ok())
        .collect();
    if crate::x509::chains_to(&leaf, intermediates, &anchors, now_unix) {
        return Ok(());
    }
    Err(EkCertificateError::UntrustedRoot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    fn ek_public() -> (TpmPublic, openssl::rsa::Rsa<openssl::pkey::Private>) {
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let modulus = rsa.n().to_vec();
        // A TPM2B_PUBLIC for an RSA-2048 EK with this modulus (standard EK template).
        let mut t = Vec::new();
        t.extend_from_slice(&0x0001u16.to_be_bytes());
        t.extend_from_slice(&0x000Bu16.to_be_bytes());
        t.extend_from_slice(&0x000300b2u32.to_be_bytes());
        t.extend_from_slice(&32u16.to_be_bytes());
        t.extend_from_slice(&[0x11; 32]);
        t.extend_from_slice(&[0x00, 0x06, 0x00, 0x80, 0x00, 0x43]);
        t.extend_from_slice(&0x0010u16.to_be_bytes());
        t.extend_from_slice(&2048u16.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&(modulus.len() as u16).to_be_bytes());
        t.extend_from_slice(&modulus);
        let mut b = (t.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(&t);
        (super::super::parse_public(&b).unwrap(), rsa)
    }

    fn root(name: &str) -> (Vec<u8>, CertificateParams, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), params, key)
    }

    fn ek_certificate(
        rsa: &openssl::rsa::Rsa<openssl::pkey::Private>,
        root: &(Vec<u8>, CertificateParams, KeyPair),
    ) -> Vec<u8> {
        let spki = openssl::pkey::PKey::from_rsa(
            openssl::rsa::Rsa::from_public_components(
                rsa.n().to_owned().unwrap(),
                rsa.e().to_owned().unwrap(),
            )
            .unwrap(),
        )
        .unwrap()
        .public_key_to_der()
        .unwrap();
        let public = rcgen::SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "TPM EK");
        let issuer = Issuer::from_params(&root.1, &root.2);
        params.signed_by(&public, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn a_maker_certified_ek_is_accepted_and_others_are_not() {
        let (ek, rsa) = ek_public();
        let maker = root("TPM Maker Root");
        let cert = ek_certificate(&rsa, &maker);
        assert!(certifies(&cert, &ek).unwrap());
        assert_eq!(
            verify(
                &cert,
                &[],
                std::slice::from_ref(&maker.0),
                &ek,
                1_900_000_000
            ),
            Ok(())
        );
        let other_maker = root("Other Maker");
        assert_eq!(
            verify(
                &cert,
                &[],
                std::slice::from_ref(&other_maker.0),
                &ek,
                1_900_000_000
            ),
            Err(EkCertificateError::UntrustedRoot)
        );
        let (other_ek, _) = ek_public();
        assert_eq!(
            verify(
                &cert,
                &[],
                std::slice::from_ref(&maker.0),
                &other_ek,
                1_900_000_000
            ),
            Err(EkCertificateError::KeyMismatch)
        );
        assert_eq!(
            verify(&[1, 2, 3], &[], &[maker.0], &ek, 0),
            Err(EkCertificateError::Malformed)
        );
    }
}
