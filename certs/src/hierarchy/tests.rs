use std::net::IpAddr;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;

use super::*;

fn ders(pem_text: &str) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem_text.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

fn one_der(pem_text: &str) -> Vec<u8> {
    let mut all = ders(pem_text);
    assert_eq!(all.len(), 1);
    all.remove(0)
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn cn(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn hosts(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn years(cert: &X509Certificate<'_>) -> f64 {
    let v = cert.validity();
    (v.not_after.timestamp() - v.not_before.timestamp()) as f64 / (365.25 * 86_400.0)
}

#[test]
fn generate_builds_the_documented_profile() {
    let ca = CaHierarchy::generate("0ne0001A2B3").unwrap();
    let root_der = one_der(ca.root_cert_pem());
    let int_der = one_der(ca.intermediate_cert_pem());
    let root = parse(&root_der);
    let int = parse(&int_der);

    assert_eq!(cn(&root), "Zerotouch Root CA (0ne0001A2B3)");
    assert_eq!(cn(&int), "Zerotouch Intermediate CA (0ne0001A2B3)");
    assert_eq!(root.issuer().as_raw(), root.subject().as_raw());
    assert_eq!(int.issuer().as_raw(), root.subject().as_raw());

    let root_bc = root.basic_constraints().unwrap().unwrap().value;
    assert!(root_bc.ca);
    assert_eq!(root_bc.path_len_constraint, Some(1));
    let int_bc = int.basic_constraints().unwrap().unwrap().value;
    assert!(int_bc.ca);
    assert_eq!(int_bc.path_len_constraint, Some(0));

    let root_ku = root.key_usage().unwrap().unwrap().value;
    assert!(root_ku.key_cert_sign() && root_ku.crl_sign() && !root_ku.digital_signature());
    let int_ku = int.key_usage().unwrap().unwrap().value;
    assert!(int_ku.key_cert_sign() && int_ku.crl_sign() && int_ku.digital_signature());

    for cert in [&root, &int] {
        assert_eq!(cert.raw_serial().len(), 16);
        assert_eq!(cert.raw_serial()[0] & 0x80, 0, "serial must be positive");
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
    }
    assert_ne!(root.raw_serial(), int.raw_serial());
    assert!((years(&root) - 20.0).abs() < 0.01, "{}", years(&root));
    assert!((years(&int) - 10.0).abs() < 0.01, "{}", years(&int));

    root.verify_signature(None).unwrap();
    int.verify_signature(Some(root.public_key())).unwrap();
    assert!(int.iter_extensions().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));

    assert!(ca.root_key_pem().unwrap().expose().contains("PRIVATE KEY"));
    assert!(ca.intermediate_key_pem().expose().contains("PRIVATE KEY"));
    assert_eq!(ders(&ca.trust_bundle_pem()), vec![root_der, int_der]);
}

#[test]
fn generate_rejects_bad_names() {
    assert_eq!(
        CaHierarchy::generate("").unwrap_err(),
        Error::InvalidName(String::new())
    );
    assert_eq!(
        CaHierarchy::generate("a\nb").unwrap_err(),
        Error::InvalidName("a\nb".into())
    );
}

#[test]
fn from_pem_round_trips() {
    let ca = CaHierarchy::generate("rt").unwrap();
    let again = CaHierarchy::from_pem(
        ca.root_cert_pem(),
        ca.root_key_pem(),
        ca.intermediate_cert_pem(),
        ca.intermediate_key_pem(),
    )
    .unwrap();
    assert_eq!(again.root_cert_pem(), ca.root_cert_pem());
    assert_eq!(again.root_key_pem(), ca.root_key_pem());
    assert_eq!(again.intermediate_cert_pem(), ca.intermediate_cert_pem());
    assert_eq!(again.intermediate_key_pem(), ca.intermediate_key_pem());
    assert_eq!(again.trust_bundle_pem(), ca.trust_bundle_pem());

    // A certificate issued by the restored hierarchy chains to the original intermediate.
    let issued = again
        .issue_server_certificate(&hosts(&["localhost"]), 30)
        .unwrap();
    assert!(ca.is_issuer_of(&issued.certificate_pem).unwrap());
}

#[test]
fn from_pem_tolerates_crlf_and_surrounding_text() {
    let ca = CaHierarchy::generate("crlf").unwrap();
    let root = format!(
        "subject=CN=whatever\r\n{}",
        ca.root_cert_pem().replace('\n', "\r\n")
    );
    let again = CaHierarchy::from_pem(
        &root,
        None,
        ca.intermediate_cert_pem(),
        ca.intermediate_key_pem(),
    )
    .unwrap();
    assert_eq!(again.root_cert_pem(), ca.root_cert_pem());
}

#[test]
fn root_key_absent_still_issues() {
    let ca = CaHierarchy::generate("offline").unwrap();
    let offline = CaHierarchy::from_pem(
        ca.root_cert_pem(),
        None,
        ca.intermediate_cert_pem(),
        ca.intermediate_key_pem(),
    )
    .unwrap();
    assert!(offline.root_key_pem().is_none());
    let issued = offline
        .issue_server_certificate(&hosts(&["dps.example.com"]), 90)
        .unwrap();
    let leaf_der = one_der(&issued.certificate_pem);
    let int_der = one_der(ca.intermediate_cert_pem());
    parse(&leaf_der)
        .verify_signature(Some(parse(&int_der).public_key()))
        .unwrap();
}

#[test]
fn key_mismatch_is_detected() {
    let a = CaHierarchy::generate("a").unwrap();
    let b = CaHierarchy::generate("b").unwrap();
    assert_eq!(
        CaHierarchy::from_pem(
            a.root_cert_pem(),
            None,
            a.intermediate_cert_pem(),
            b.intermediate_key_pem(),
        )
        .unwrap_err(),
        Error::KeyMismatch {
            what: "intermediate"
        }
    );
    assert_eq!(
        CaHierarchy::from_pem(
            a.root_cert_pem(),
            b.root_key_pem(),
            a.intermediate_cert_pem(),
            a.intermediate_key_pem(),
        )
        .unwrap_err(),
        Error::KeyMismatch { what: "root" }
    );
    // The root key where the intermediate key belongs.
    assert_eq!(
        CaHierarchy::from_pem(
            a.root_cert_pem(),
            None,
            a.intermediate_cert_pem(),
            a.root_key_pem().unwrap(),
        )
        .unwrap_err(),
        Error::KeyMismatch {
            what: "intermediate"
        }
    );
}

#[test]
fn intermediate_from_another_root_is_rejected() {
    let a = CaHierarchy::generate("a").unwrap();
    let b = CaHierarchy::generate("b").unwrap();
    assert_eq!(
        CaHierarchy::from_pem(
            a.root_cert_pem(),
            a.root_key_pem(),
            b.intermediate_cert_pem(),
            b.intermediate_key_pem(),
        )
        .unwrap_err(),
        Error::NotSignedByRoot
    );
    // Same names, different keys: the name check passes, the signature does not.
    let a2 = CaHierarchy::generate("a").unwrap();
    assert_eq!(
        CaHierarchy::from_pem(
            a.root_cert_pem(),
            None,
            a2.intermediate_cert_pem(),
            a2.intermediate_key_pem(),
        )
        .unwrap_err(),
        Error::NotSignedByRoot
    );
}

#[test]
fn a_leaf_is_not_an_intermediate() {
    let ca = CaHierarchy::generate("leaf").unwrap();
    let issued = ca
        .issue_server_certificate(&hosts(&["localhost"]), 30)
        .unwrap();
    assert_eq!(
        CaHierarchy::from_pem(
            ca.root_cert_pem(),
            None,
            &issued.certificate_pem,
            &issued.private_key,
        )
        .unwrap_err(),
        Error::NotACa {
            what: "intermediate certificate"
        }
    );
    assert_eq!(
        CaHierarchy::from_pem(
            &issued.certificate_pem,
            None,
            ca.intermediate_cert_pem(),
            ca.intermediate_key_pem(),
        )
        .unwrap_err(),
        Error::NotACa {
            what: "root certificate"
        }
    );
}

#[test]
fn garbage_pem_is_a_typed_error() {
    let ca = CaHierarchy::generate("garbage").unwrap();
    let junk = SecretPem::new("not a key".into());
    let truncated = &ca.root_cert_pem()[..ca.root_cert_pem().len() / 2];
    let err = |r: Result<CaHierarchy, Error>| match r.unwrap_err() {
        Error::InvalidPem { what, .. } => what,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        err(CaHierarchy::from_pem(
            "",
            None,
            ca.intermediate_cert_pem(),
            ca.intermediate_key_pem()
        )),
        "root certificate"
    );
    assert_eq!(
        err(CaHierarchy::from_pem(
            truncated,
            None,
            ca.intermediate_cert_pem(),
            ca.intermediate_key_pem()
        )),
        "root certificate"
    );
    assert_eq!(
        err(CaHierarchy::from_pem(
            &ca.trust_bundle_pem(),
            None,
            ca.intermediate_cert_pem(),
            ca.intermediate_key_pem()
        )),
        "root certificate"
    );
    assert_eq!(
        err(CaHierarchy::from_pem(
            ca.root_cert_pem(),
            Some(&junk),
            ca.intermediate_cert_pem(),
            ca.intermediate_key_pem()
        )),
        "root key"
    );
    assert_eq!(
        err(CaHierarchy::from_pem(
            ca.root_cert_pem(),
            None,
            "junk",
            ca.intermediate_key_pem()
        )),
        "intermediate certificate"
    );
    assert_eq!(
        err(CaHierarchy::from_pem(
            ca.root_cert_pem(),
            None,
            ca.intermediate_cert_pem(),
            &junk
        )),
        "intermediate key"
    );
    // A certificate where a key belongs.
    let cert_as_key = SecretPem::new(ca.intermediate_cert_pem().to_owned());
    assert_eq!(
        err(CaHierarchy::from_pem(
            ca.root_cert_pem(),
            None,
            ca.intermediate_cert_pem(),
            &cert_as_key
        )),
        "intermediate key"
    );
    // Error messages never carry key material.
    let key_text = ca.intermediate_key_pem().expose().to_owned();
    let body_line = key_text.lines().nth(1).unwrap();
    let e = CaHierarchy::from_pem(
        ca.root_cert_pem(),
        None,
        ca.intermediate_cert_pem(),
        &SecretPem::new(key_text.replace(body_line, "AAAA")),
    )
    .unwrap_err();
    assert!(!e.to_string().contains(body_line));
}

#[test]
fn server_certificate_chain_verifies_and_has_the_profile() {
    let ca = CaHierarchy::generate("srv").unwrap();
    let names = hosts(&["localhost", "127.0.0.1", "::1", "dps.example.com"]);
    let issued = ca.issue_server_certificate(&names, 397).unwrap();

    let chain = ders(&issued.chain_pem);
    assert_eq!(chain.len(), 2);
    let leaf_der = one_der(&issued.certificate_pem);
    assert_eq!(chain[0], leaf_der);
    assert_eq!(chain[1], one_der(ca.intermediate_cert_pem()));

    let root_der = one_der(ca.root_cert_pem());
    let root = parse(&root_der);
    let int = parse(&chain[1]);
    let leaf = parse(&leaf_der);
    leaf.verify_signature(Some(int.public_key())).unwrap();
    int.verify_signature(Some(root.public_key())).unwrap();
    assert!(leaf.verify_signature(Some(root.public_key())).is_err());
    assert_eq!(leaf.issuer().as_raw(), int.subject().as_raw());

    assert_eq!(cn(&leaf), "localhost");
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert_eq!(leaf.raw_serial().len(), 16);

    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in &san.general_names {
        match name {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(b) => ips.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                _ => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    assert_eq!(dns, vec!["localhost", "dps.example.com"]);
    assert_eq!(
        ips,
        vec![
            "127.0.0.1".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );

    let v = leaf.validity();
    let days = (v.not_after.timestamp() - v.not_before.timestamp()) as f64 / 86_400.0;
    assert!((days - 397.0).abs() < 0.01, "{days}");

    // The returned key is the leaf's key.
    let key = KeyPair::from_pem(issued.private_key.expose()).unwrap();
    use rcgen::PublicKeyData as _;
    assert_eq!(key.subject_public_key_info(), leaf.public_key().raw);
    assert_eq!(format!("{:?}", issued.private_key), "[redacted]");
    assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
}

#[test]
fn server_certificate_ip_cn_and_duplicates() {
    let ca = CaHierarchy::generate("ip").unwrap();
    let issued = ca
        .issue_server_certificate(
            &hosts(&["127.0.0.1", "LOCALHOST", "localhost", "127.0.0.1"]),
            1,
        )
        .unwrap();
    let der = one_der(&issued.certificate_pem);
    let leaf = parse(&der);
    assert_eq!(cn(&leaf), "127.0.0.1");
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 2);
}

#[test]
fn server_certificate_long_first_name_has_no_cn() {
    let ca = CaHierarchy::generate("long").unwrap();
    let long = format!("{}.example.com", "a".repeat(60));
    let issued = ca
        .issue_server_certificate(std::slice::from_ref(&long), 1)
        .unwrap();
    let der = one_der(&issued.certificate_pem);
    let leaf = parse(&der);
    assert!(leaf.subject().iter_common_name().next().is_none());
    assert!(crate::server_certificate_covers(&issued.chain_pem, &[long]).is_ok());
}

#[test]
fn server_certificate_argument_errors() {
    let ca = CaHierarchy::generate("args").unwrap();
    assert_eq!(
        ca.issue_server_certificate(&[], 30).unwrap_err(),
        Error::NoHostnames
    );
    assert_eq!(
        ca.issue_server_certificate(&hosts(&["localhost", "bad host"]), 30)
            .unwrap_err(),
        Error::InvalidHostname("bad host".into())
    );
    assert_eq!(
        ca.issue_server_certificate(&hosts(&["localhost"]), 0)
            .unwrap_err(),
        Error::InvalidValidity
    );
    assert_eq!(
        ca.issue_server_certificate(&hosts(&["localhost"]), 20 * 365)
            .unwrap_err(),
        Error::ValidityBeyondIssuer { days: 20 * 365 }
    );
    assert_eq!(
        ca.issue_server_certificate(&hosts(&["localhost"]), u32::MAX)
            .unwrap_err(),
        Error::ValidityBeyondIssuer { days: u32::MAX }
    );
}

#[test]
fn is_issuer_of_tells_hierarchies_apart() {
    let a = CaHierarchy::generate("a").unwrap();
    let b = CaHierarchy::generate("a").unwrap();
    let from_a = a
        .issue_server_certificate(&hosts(&["localhost"]), 30)
        .unwrap();
    assert!(a.is_issuer_of(&from_a.chain_pem).unwrap());
    assert!(!b.is_issuer_of(&from_a.certificate_pem).unwrap());
    assert!(!a.is_issuer_of(a.root_cert_pem()).unwrap());
    assert!(matches!(
        a.is_issuer_of("nope"),
        Err(Error::InvalidPem { .. })
    ));
}

#[test]
fn debug_does_not_leak_keys() {
    let ca = CaHierarchy::generate("dbg").unwrap();
    let text = format!("{ca:?}");
    assert!(text.contains("[redacted]"));
    assert!(!text.contains("PRIVATE KEY"));
}

#[test]
fn hierarchy_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CaHierarchy>();
}

#[test]
fn rotation_issues_from_a_new_intermediate_and_keeps_the_old_one_trusted() {
    let ca = CaHierarchy::generate("0ne00000042").unwrap();
    let rotated = ca.rotate_intermediate("0ne00000042, generation 2").unwrap();
    let new = parse_one(rotated.intermediate_cert_pem());
    assert_eq!(
        cn(&new),
        "Zerotouch Intermediate CA (0ne00000042, generation 2)"
    );
    let root_der = one_der(ca.root_cert_pem());
    let root = parse(&root_der);
    assert!(new.verify_signature(Some(root.public_key())).is_ok());
    assert!(new.validity().not_after.to_datetime() <= root.validity().not_after.to_datetime());
    assert_ne!(rotated.intermediate_key_pem(), ca.intermediate_key_pem());
    assert_eq!(rotated.root_cert_pem(), ca.root_cert_pem());
    assert_eq!(
        rotated.previous_intermediate_pems(),
        [ca.intermediate_cert_pem().to_string()]
    );
    // Bundle: root, new, old.
    let bundle = ders(&rotated.trust_bundle_pem());
    assert_eq!(
        bundle,
        vec![
            root_der.clone(),
            one_der(rotated.intermediate_cert_pem()),
            one_der(ca.intermediate_cert_pem())
        ]
    );
    // New certificates come from the new intermediate.
    let server = rotated
        .issue_server_certificate(&hosts(&["localhost"]), 30)
        .unwrap();
    assert!(rotated.is_issuer_of(&server.certificate_pem).unwrap());
    assert!(!ca.is_issuer_of(&server.certificate_pem).unwrap());

    // A second rotation keeps both earlier intermediates, newest first.
    let third = rotated
        .rotate_intermediate("0ne00000042, generation 3")
        .unwrap();
    assert_eq!(
        third.previous_intermediate_pems(),
        [
            rotated.intermediate_cert_pem().to_string(),
            ca.intermediate_cert_pem().to_string()
        ]
    );

    // Reloading: the previous intermediates are checked against the root.
    let reloaded = CaHierarchy::from_pem(
        rotated.root_cert_pem(),
        None,
        rotated.intermediate_cert_pem(),
        rotated.intermediate_key_pem(),
    )
    .unwrap()
    .with_previous_intermediates(&[
        ca.intermediate_cert_pem().to_string(),
        rotated.intermediate_cert_pem().to_string(),
    ])
    .unwrap();
    assert_eq!(reloaded.trust_bundle_pem(), rotated.trust_bundle_pem());
    let foreign = CaHierarchy::generate("other").unwrap();
    assert_eq!(
        reloaded
            .with_previous_intermediates(&[foreign.intermediate_cert_pem().to_string()])
            .err(),
        Some(Error::NotSignedByRoot)
    );

    // An offline root cannot rotate.
    let offline = CaHierarchy::from_pem(
        ca.root_cert_pem(),
        None,
        ca.intermediate_cert_pem(),
        ca.intermediate_key_pem(),
    )
    .unwrap();
    assert_eq!(
        offline.rotate_intermediate("x").err(),
        Some(Error::RootKeyMissing)
    );
    assert!(matches!(
        ca.rotate_intermediate("bad\nname"),
        Err(Error::InvalidName(_))
    ));
}

fn parse_one(pem_text: &str) -> X509Certificate<'static> {
    let der: &'static [u8] = Box::leak(one_der(pem_text).into_boxed_slice());
    parse(der)
}
