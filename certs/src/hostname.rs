//! Hostnames for server certificates: IP literals become IP SANs, the rest must be DNS names.

use std::net::IpAddr;

use crate::Error;

/// A validated hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    /// A DNS name as given (case preserved); compare case-insensitively.
    Dns(String),
}

/// Classifies and validates one hostname.
///
/// DNS names follow the preferred syntax of RFC 1123: dot-separated labels of 1–63 letters,
/// digits and hyphens, not starting or ending with a hyphen, 253 characters at most, no trailing
/// dot, and a final label that is not all digits (so "256.1.1.1" is rejected rather than
/// becoming a DNS SAN). A leading `*.` wildcard label is allowed.
pub(crate) fn parse(hostname: &str) -> Result<Host, Error> {
    if let Ok(ip) = hostname.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let invalid = || Error::InvalidHostname(hostname.to_owned());
    let name = hostname.strip_prefix("*.").unwrap_or(hostname);
    if name.is_empty() || hostname.len() > 253 {
        return Err(invalid());
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(invalid());
        }
    }
    if labels
        .last()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid());
    }
    Ok(Host::Dns(hostname.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_are_ips() {
        assert_eq!(
            parse("127.0.0.1").unwrap(),
            Host::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(parse("::1").unwrap(), Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            parse("fe80::1").unwrap(),
            Host::Ip("fe80::1".parse().unwrap())
        );
    }

    #[test]
    fn dns_names_are_accepted() {
        for name in [
            "localhost",
            "dps.example.com",
            "a-b.c1",
            "*.example.com",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(parse(name).unwrap(), Host::Dns(name.into()), "{name}");
        }
    }

    #[test]
    fn bad_names_are_rejected() {
        let long_label = "a".repeat(64);
        let long_name = format!("{}.com", "a.".repeat(130));
        for name in [
            "",
            ".",
            "a..b",
            "-a.com",
            "a-.com",
            "a b",
            "a_b.com",
            "exa mple",
            "example.com.",
            "256.1.1.1",
            "1.2.3",
            "*.",
            "*",
            "a.*.com",
            "[::1]",
            "héllo.com",
            "a\n",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert_eq!(
                parse(name),
                Err(Error::InvalidHostname(name.into())),
                "{name:?}"
            );
        }
    }
}
