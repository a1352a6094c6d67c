//! PEM in and out for certificates. Private keys are parsed by rcgen directly.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use x509_parser::pem::Pem;

use crate::Error;

/// Encodes DER as PEM with the given label, 64 characters per line, trailing newline.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // Base64 output is ASCII, so splitting the bytes into chunks keeps every chunk valid UTF-8.
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// All PEM blocks of `input`, in order, as (label, DER).
fn blocks(input: &str, what: &'static str) -> Result<Vec<Pem>, Error> {
    Pem::iter_from_buffer(input.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidPem {
            what,
            reason: e.to_string(),
        })
}

/// DER of the one and only `CERTIFICATE` block in `input`; any other block is an error.
pub(crate) fn single_certificate(input: &str, what: &'static str) -> Result<Vec<u8>, Error> {
    let mut blocks = blocks(input, what)?;
    if blocks.len() != 1 {
        return Err(Error::InvalidPem {
            what,
            reason: format!("expected exactly one PEM block, found {}", blocks.len()),
        });
    }
    let block = blocks.remove(0);
    if block.label != "CERTIFICATE" {
        return Err(Error::InvalidPem {
            what,
            reason: format!("expected a CERTIFICATE block, found {}", block.label),
        });
    }
    Ok(block.contents)
}

/// DER of the first `CERTIFICATE` block in `input` (the leaf of a chain).
pub(crate) fn first_certificate(input: &str, what: &'static str) -> Result<Vec<u8>, Error> {
    blocks(input, what)?
        .into_iter()
        .find(|block| block.label == "CERTIFICATE")
        .map(|block| block.contents)
        .ok_or_else(|| Error::InvalidPem {
            what,
            reason: "no CERTIFICATE block".into(),
        })
}

/// Parses DER as one X.509 certificate with nothing after it.
pub(crate) fn parse_der<'a>(
    der: &'a [u8],
    what: &'static str,
) -> Result<x509_parser::certificate::X509Certificate<'a>, Error> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Error::InvalidPem {
            what,
            reason: "trailing data after the certificate".into(),
        }),
        Err(e) => Err(Error::InvalidPem {
            what,
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_wraps_at_64_and_round_trips() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = encode("CERTIFICATE", &der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.ends_with("-----END CERTIFICATE-----\n"));
        assert!(pem.lines().all(|line| line.len() <= 64));
        assert_eq!(single_certificate(&pem, "test").unwrap(), der);
    }

    #[test]
    fn single_rejects_zero_two_and_other_labels() {
        let one = encode("CERTIFICATE", b"abc");
        assert!(matches!(
            single_certificate("", "x"),
            Err(Error::InvalidPem { what: "x", .. })
        ));
        let two = format!("{one}{one}");
        assert!(single_certificate(&two, "x").is_err());
        assert_eq!(first_certificate(&two, "x").unwrap(), b"abc");
        let key = encode("PRIVATE KEY", b"abc");
        assert!(single_certificate(&key, "x").is_err());
        assert!(first_certificate(&key, "x").is_err());
        assert!(
            single_certificate(
                "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                "x"
            )
            .is_err()
        );
        assert!(single_certificate("-----BEGIN CERTIFICATE-----\nAAAA\n", "x").is_err());
    }

    #[test]
    fn parse_der_rejects_garbage_and_trailing_data() {
        assert!(parse_der(b"", "x").is_err());
        assert!(parse_der(b"\x30\x03abc", "x").is_err());
    }
}
