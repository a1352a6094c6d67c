//! DER plumbing shared by the OCSP, EST, CRL and extension code.
//!
//! Reading untrusted input goes through asn1-rs (the parser under x509-parser, already used for
//! every certificate and CSR this crate reads): [`Reader`] walks one level of TLVs at a time and
//! never panics. Writing goes through yasna, as rcgen does; it only ever sees data this crate
//! built or already parsed.

use time::OffsetDateTime;
use x509_parser::asn1_rs::{self, Class, FromDer as _};

/// The input is not the DER this crate expected; callers turn it into their own error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// One TLV: its identifier, its contents and the whole encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Element<'a> {
    /// The tag class.
    pub class: Class,
    /// Whether the constructed bit is set.
    pub constructed: bool,
    /// The tag number.
    pub tag: u32,
    /// The contents octets.
    pub content: &'a [u8],
    /// Identifier, length and contents, as received.
    pub raw: &'a [u8],
}

impl<'a> Element<'a> {
    /// Whether this is the given tag.
    fn is(&self, class: Class, tag: u32, constructed: bool) -> bool {
        self.class == class && self.tag == tag && self.constructed == constructed
    }

    /// A reader over the contents of a constructed element.
    pub fn children(&self) -> Reader<'a> {
        Reader::new(self.content)
    }

    /// The contents of an OCTET STRING (universal 4, primitive).
    pub fn octet_string(&self) -> Result<&'a [u8], Malformed> {
        if self.is(Class::Universal, TAG_OCTET_STRING, false) {
            Ok(self.content)
        } else {
            Err(Malformed)
        }
    }

    /// The contents of an OBJECT IDENTIFIER (universal 6, primitive, non-empty).
    pub fn oid(&self) -> Result<&'a [u8], Malformed> {
        if self.is(Class::Universal, TAG_OID, false) && !self.content.is_empty() {
            Ok(self.content)
        } else {
            Err(Malformed)
        }
    }

    /// The contents of an INTEGER (universal 2), checked to be minimally encoded.
    pub fn integer(&self) -> Result<&'a [u8], Malformed> {
        if !self.is(Class::Universal, TAG_INTEGER, false) {
            return Err(Malformed);
        }
        match self.content {
            [] => Err(Malformed),
            [0x00, next, ..] if next & 0x80 == 0 => Err(Malformed),
            [0xff, next, ..] if next & 0x80 != 0 => Err(Malformed),
            bytes => Ok(bytes),
        }
    }

    /// A small non-negative INTEGER (a version field).
    pub fn small_uint(&self) -> Result<u8, Malformed> {
        match self.integer()? {
            [value] if value & 0x80 == 0 => Ok(*value),
            _ => Err(Malformed),
        }
    }

    /// A BOOLEAN (DER: `0x00` or `0xff`).
    pub fn boolean(&self) -> Result<bool, Malformed> {
        if !self.is(Class::Universal, TAG_BOOLEAN, false) {
            return Err(Malformed);
        }
        match self.content {
            [0x00] => Ok(false),
            [0xff] => Ok(true),
            _ => Err(Malformed),
        }
    }
}

const TAG_BOOLEAN: u32 = 1;
const TAG_INTEGER: u32 = 2;
const TAG_OCTET_STRING: u32 = 4;
const TAG_OID: u32 = 6;
const TAG_SEQUENCE: u32 = 16;

/// Reads consecutive DER elements from a buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Reader { rest: input }
    }

    /// Reads exactly one element that spans all of `input`.
    pub fn single(input: &'a [u8]) -> Result<Element<'a>, Malformed> {
        let mut reader = Reader::new(input);
        let element = reader.next()?;
        reader.finish()?;
        Ok(element)
    }

    /// Reads exactly one SEQUENCE that spans all of `input`.
    pub fn single_sequence(input: &'a [u8]) -> Result<Element<'a>, Malformed> {
        let mut reader = Reader::new(input);
        let element = reader.sequence()?;
        reader.finish()?;
        Ok(element)
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next element, whatever it is.
    pub fn next(&mut self) -> Result<Element<'a>, Malformed> {
        if self.rest.is_empty() {
            return Err(Malformed);
        }
        let input = self.rest;
        let (rest, any) = asn1_rs::Any::from_der(input).map_err(|_| Malformed)?;
        let consumed = input.len().checked_sub(rest.len()).ok_or(Malformed)?;
        let raw = input.get(..consumed).ok_or(Malformed)?;
        self.rest = rest;
        Ok(Element {
            class: any.header.class(),
            constructed: any.header.is_constructed(),
            tag: any.header.tag().0,
            content: any.data,
            raw,
        })
    }

    /// The next element, which must be a SEQUENCE.
    pub fn sequence(&mut self) -> Result<Element<'a>, Malformed> {
        let element = self.next()?;
        if element.is(Class::Universal, TAG_SEQUENCE, true) {
            Ok(element)
        } else {
            Err(Malformed)
        }
    }

    /// The next element if it is the constructed context-specific `[tag]`; nothing is
    /// consumed otherwise.
    pub fn optional_context(&mut self, tag: u32) -> Result<Option<Element<'a>>, Malformed> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let mut lookahead = *self;
        let element = lookahead.next()?;
        if element.is(Class::ContextSpecific, tag, true) {
            *self = lookahead;
            Ok(Some(element))
        } else {
            Ok(None)
        }
    }

    /// Fails unless everything has been read.
    pub fn finish(&self) -> Result<(), Malformed> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Malformed)
        }
    }
}

/// `time` as an ASN.1 GeneralizedTime (whole seconds, `Z`), or `None` outside years 0–9999.
pub(crate) fn generalized_time(unix: i64) -> Option<yasna::models::GeneralizedTime> {
    let datetime = OffsetDateTime::from_unix_timestamp(unix).ok()?;
    yasna::models::GeneralizedTime::from_datetime_opt(datetime)
}

/// The DER contents of an OBJECT IDENTIFIER with these components (for comparing with
/// [`Element::oid`]).
pub(crate) fn oid_content(components: &[u64]) -> Vec<u8> {
    let der = yasna::construct_der(|w| {
        w.write_oid(&yasna::models::ObjectIdentifier::from_slice(components))
    });
    // Identifier and a short length: OIDs here are far below 128 bytes.
    der.get(2..).map(<[u8]>::to_vec).unwrap_or_default()
}

/// The dotted form of OID contents, for messages (`"?"` when the contents are not an OID).
pub(crate) fn oid_string(content: &[u8]) -> String {
    asn1_rs::Oid::new(std::borrow::Cow::Borrowed(content))
        .to_id_string()
        .chars()
        .take(100)
        .collect()
}

/// The signature algorithm identifier (DER) for an rcgen key's algorithm, or `None` for one
/// this crate does not sign OCSP responses with.
pub(crate) fn signature_algorithm_der(algorithm: &rcgen::SignatureAlgorithm) -> Option<Vec<u8>> {
    use rcgen::{
        PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256,
        PKCS_RSA_SHA384, PKCS_RSA_SHA512,
    };
    // (OID, whether the parameters are an explicit NULL): RFC 4055 for RSA, RFC 5758 for
    // ECDSA (no parameters), RFC 8410 for Ed25519 (no parameters).
    let (oid, null): (&[u64], bool) = if *algorithm == PKCS_ECDSA_P256_SHA256 {
        (&[1, 2, 840, 10045, 4, 3, 2], false)
    } else if *algorithm == PKCS_ECDSA_P384_SHA384 {
        (&[1, 2, 840, 10045, 4, 3, 3], false)
    } else if *algorithm == PKCS_RSA_SHA256 {
        (&[1, 2, 840, 113549, 1, 1, 11], true)
    } else if *algorithm == PKCS_RSA_SHA384 {
        (&[1, 2, 840, 113549, 1, 1, 12], true)
    } else if *algorithm == PKCS_RSA_SHA512 {
        (&[1, 2, 840, 113549, 1, 1, 13], true)
    } else if *algorithm == PKCS_ED25519 {
        (&[1, 3, 101, 112], false)
    } else {
        return None;
    };
    Some(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next()
                .write_oid(&yasna::models::ObjectIdentifier::from_slice(oid));
            if null {
                w.next().write_null();
            }
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_walks_and_rejects() {
        // SEQUENCE { INTEGER 5, [0] { BOOLEAN TRUE } }
        let der = [0x30, 0x08, 0x02, 0x01, 0x05, 0xa0, 0x03, 0x01, 0x01, 0xff];
        let seq = Reader::single(&der).unwrap();
        let mut inner = seq.children();
        assert_eq!(inner.next().unwrap().small_uint().unwrap(), 5);
        assert!(inner.optional_context(1).unwrap().is_none());
        let tagged = inner.optional_context(0).unwrap().unwrap();
        assert!(Reader::single(tagged.content).unwrap().boolean().unwrap());
        assert!(inner.is_empty());
        assert!(inner.next().is_err());

        assert!(Reader::single(&der[..5]).is_err());
        assert!(Reader::single(&[0x30, 0x00, 0x00]).is_err());
        // Non-minimal INTEGER, huge length, indefinite length.
        let bad_int = Reader::single(&[0x02, 0x02, 0x00, 0x01]).unwrap();
        assert!(bad_int.integer().is_err());
        assert!(
            Reader::single(&[0x04, 0x88, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err()
        );
        assert!(Reader::single(&[0x30, 0x80, 0x00, 0x00]).is_err());
    }

    #[test]
    fn oid_helpers() {
        assert_eq!(
            oid_content(&[1, 3, 14, 3, 2, 26]),
            [0x2b, 0x0e, 0x03, 0x02, 0x1a]
        );
        assert_eq!(
            oid_string(&oid_content(&[1, 3, 14, 3, 2, 26])),
            "1.3.14.3.2.26"
        );
        assert!(generalized_time(253_402_300_800).is_none()); // year 10000
        assert_eq!(
            generalized_time(0).unwrap().to_bytes(),
            b"19700101000000Z".to_vec()
        );
    }
}
