//! A private key in PEM form that refuses to be printed.

use std::fmt;

/// PEM text of a private key.
///
/// `Debug` and `Display` print `[redacted]`, and the type deliberately does not implement
/// `Serialize`: the only way to the text is [`SecretPem::expose`], which is easy to grep for.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(String);

impl SecretPem {
    /// Wraps PEM text of a private key.
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text. Call this only to hand the key to storage or to a TLS acceptor.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        // A real key, made now: no key material is ever committed.
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let secret = SecretPem::new(pem.clone());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), pem);
        assert!(!format!("{secret:?}").contains(&pem[40..60]));
    }
}
