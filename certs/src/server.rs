//! Deciding whether the server's TLS certificate still fits its configuration.

use std::net::IpAddr;

use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::hostname::{self, Host};
use crate::{Error, pem};

/// A server certificate that expires within this many days no longer "covers" anything, so
/// the service re-issues it on start.
pub const RENEW_BEFORE_DAYS: i64 = 30;

/// Whether the server certificate in `cert_pem` (the first certificate if it is a chain) names
/// every one of `hostnames` in its SANs and is valid now and for at least
/// [`RENEW_BEFORE_DAYS`] more days. Uses the system clock; see
/// [`server_certificate_covers_at`].
pub fn server_certificate_covers(cert_pem: &str, hostnames: &[String]) -> Result<bool, Error> {
    server_certificate_covers_at(
        cert_pem,
        hostnames,
        OffsetDateTime::now_utc().unix_timestamp(),
    )
}

/// [`server_certificate_covers`] at a given time (Unix seconds).
///
/// DNS names compare case-insensitively and literally (a `*.example.com` SAN covers only the
/// configured hostname `*.example.com`); IP literals compare as addresses. Invalid hostnames
/// and an empty list are errors, as they would be for issuance.
pub fn server_certificate_covers_at(
    cert_pem: &str,
    hostnames: &[String],
    now_unix: i64,
) -> Result<bool, Error> {
    if hostnames.is_empty() {
        return Err(Error::NoHostnames);
    }
    let wanted = hostnames
        .iter()
        .map(|h| hostname::parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let der = pem::first_certificate(cert_pem, "server certificate")?;
    let cert = pem::parse_der(&der, "server certificate")?;

    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    let renew_at = not_after.saturating_sub(RENEW_BEFORE_DAYS.saturating_mul(86_400));
    if now_unix < not_before || now_unix > renew_at {
        return Ok(false);
    }

    let mut dns: Vec<&str> = Vec::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(name) => dns.push(name),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                        ips.push(IpAddr::from(octets));
                    } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                        ips.push(IpAddr::from(octets));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(wanted.iter().all(|host| match host {
        Host::Ip(ip) => ips.contains(ip),
        Host::Dns(name) => dns.iter().any(|d| d.eq_ignore_ascii_case(name)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CaHierarchy;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const DAY: i64 = 86_400;

    #[test]
    fn covers_exact_subset_and_case() {
        let ca = CaHierarchy::generate("cov").unwrap();
        let issued = ca
            .issue_server_certificate(&hosts(&["localhost", "127.0.0.1", "::1"]), 365)
            .unwrap();
        for pem in [&issued.certificate_pem, &issued.chain_pem] {
            assert!(
                server_certificate_covers(pem, &hosts(&["localhost", "127.0.0.1", "::1"])).unwrap()
            );
            assert!(server_certificate_covers(pem, &hosts(&["::1"])).unwrap());
            assert!(server_certificate_covers(pem, &hosts(&["LocalHost"])).unwrap());
            assert!(server_certificate_covers(pem, &hosts(&["0:0:0:0:0:0:0:1"])).unwrap());
            assert!(
                !server_certificate_covers(pem, &hosts(&["localhost", "dps.example.com"])).unwrap()
            );
            assert!(!server_certificate_covers(pem, &hosts(&["127.0.0.2"])).unwrap());
            // The IP as a DNS-looking string is still an IP; a DNS name never matches an IP SAN.
            assert!(!server_certificate_covers(pem, &hosts(&["localhost.localdomain"])).unwrap());
        }
    }

    #[test]
    fn covers_requires_thirty_days_left() {
        let ca = CaHierarchy::generate("exp").unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let short = ca
            .issue_server_certificate(&hosts(&["localhost"]), 29)
            .unwrap();
        assert!(
            !server_certificate_covers(&short.certificate_pem, &hosts(&["localhost"])).unwrap()
        );
        let long = ca
            .issue_server_certificate(&hosts(&["localhost"]), 60)
            .unwrap();
        let pem = &long.certificate_pem;
        let names = hosts(&["localhost"]);
        assert!(server_certificate_covers_at(pem, &names, now).unwrap());
        assert!(server_certificate_covers_at(pem, &names, now + 29 * DAY).unwrap());
        assert!(!server_certificate_covers_at(pem, &names, now + 31 * DAY).unwrap());
        assert!(!server_certificate_covers_at(pem, &names, now + 61 * DAY).unwrap());
        // Not valid yet.
        assert!(!server_certificate_covers_at(pem, &names, now - DAY).unwrap());
        assert!(!server_certificate_covers_at(pem, &names, i64::MIN).unwrap());
        assert!(!server_certificate_covers_at(pem, &names, i64::MAX).unwrap());
    }

    #[test]
    fn covers_errors() {
        let ca = CaHierarchy::generate("err").unwrap();
        let issued = ca
            .issue_server_certificate(&hosts(&["localhost"]), 60)
            .unwrap();
        assert_eq!(
            server_certificate_covers(&issued.certificate_pem, &[]).unwrap_err(),
            Error::NoHostnames
        );
        assert_eq!(
            server_certificate_covers(&issued.certificate_pem, &hosts(&["a b"])).unwrap_err(),
            Error::InvalidHostname("a b".into())
        );
        assert!(matches!(
            server_certificate_covers("", &hosts(&["localhost"])),
            Err(Error::InvalidPem { .. })
        ));
        assert!(matches!(
            server_certificate_covers(issued.private_key.expose(), &hosts(&["localhost"])),
            Err(Error::InvalidPem { .. })
        ));
    }

    #[test]
    fn covers_handles_a_certificate_without_sans() {
        let ca = CaHierarchy::generate("nosan").unwrap();
        // The root has no SANs at all.
        assert!(!server_certificate_covers(ca.root_cert_pem(), &hosts(&["localhost"])).unwrap());
    }
}
