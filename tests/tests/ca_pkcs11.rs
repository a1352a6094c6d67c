//! The intermediate CA key in a PKCS#11 token (SoftHSM2): imported with
//! `zerotouch ca import-to-pkcs11`, the key file gone, and after a restart with `ca.pkcs11`
//! a device registering with a CSR gets a certificate that `openssl verify` accepts, and the
//! CRL (signed in the token) verifies too.
//!
//! SoftHSM2 finds its token directory through `SOFTHSM2_CONF`, which the library reads from
//! the environment of the process that loads it: the server and the CLI run as real
//! `zerotouch` processes (`cluster::Node`) with the variable set.

use std::fs;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_tests::cluster::{Api, Node, address, address_block, register};
use zerotouch_tests::pki;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[test]
fn issuance_works_with_the_intermediate_key_in_softhsm2() {
    let found = Command::new("softhsm2-util").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()) && Path::new(MODULE).exists(),
        "softhsm2-util or {MODULE} is missing: install the Debian package `softhsm2` \
         (scripts/test and .ci/run install it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "zt"])
        .args(["--pin", "1234", "--so-pin", "5678"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let pin_file = dir.path().join("pin");
    fs::write(&pin_file, "1234\n").unwrap();

    // First start: a plain CA with the key in ca/intermediate.key.
    let conf = conf.display().to_string();
    let mut node = Node::start_with_env(
        &address(address_block(), 1),
        "all",
        "",
        &[],
        &[("SOFTHSM2_CONF", &conf)],
    );
    let key_file = node.data_dir().join("ca/intermediate.key");
    assert!(key_file.exists());
    let bundle_before = fs::read_to_string(node.ca_bundle()).unwrap();

    // Without ca.pkcs11 the import refuses; with it, the key goes into the token and the
    // file goes away.
    node.kill();
    let refused = node.cli_output(&["ca", "import-to-pkcs11"]);
    assert!(!refused.status.success(), "imported without ca.pkcs11");
    node.append_config(&format!(
        "\n[ca.pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"zt\"\n\
         key_label = \"zerotouch-intermediate\"\npin_file = \"{}\"\n",
        pin_file.display()
    ));
    let report: Value = serde_json::from_str(&node.cli(&["ca", "import-to-pkcs11"])).unwrap();
    assert_eq!(report["keyLabel"], "zerotouch-intermediate", "{report}");
    assert!(!key_file.exists(), "the key file is deleted");
    // A second import has nothing to import.
    assert!(
        !node
            .cli_output(&["ca", "import-to-pkcs11"])
            .status
            .success()
    );
    // Restart with the key in the token only.
    node.spawn();
    assert_eq!(fs::read_to_string(node.ca_bundle()).unwrap(), bundle_before);
    assert!(!key_file.exists(), "the server wrote the key back");

    // A device registers with a CSR and gets a certificate signed in the token.
    let credentials = node.credentials();
    let api = Api::new(
        credentials["dpsConnectionString"].as_str().unwrap(),
        &node.ca_bundle(),
    );
    let id = "p11-device";
    let (status, body, _) = zerotouch_tests::send(
        api.request(Method::PUT, &format!("/enrollments/{id}"), "2021-10-01")
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{body}");
    let key = body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let client = zerotouch_tests::client_trusting(&node.ca_bundle(), None);
    let (csr, _device_key) = pki::csr(id);
    let state = register(
        &client,
        &node.url(""),
        credentials["idScope"].as_str().unwrap(),
        id,
        &key,
        Some(&json!({"csr": B64.encode(&csr)})),
    );
    assert_eq!(state["status"], "assigned", "{state}");
    let chain = state["issuedCertificateChain"]
        .as_array()
        .unwrap_or_else(|| panic!("no issuedCertificateChain: {state}"));
    let leaf = pki::pem_of_der(&B64.decode(chain[0].as_str().unwrap()).unwrap());

    let work = tempfile::tempdir().unwrap();
    let leaf_file = work.path().join("leaf.pem");
    fs::write(&leaf_file, &leaf).unwrap();
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(node.ca_bundle())
        .arg(&leaf_file)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // The CRL is signed in the token as well.
    let crl = client
        .get(node.url("/crl?format=pem"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let crl_file = work.path().join("crl.pem");
    fs::write(&crl_file, crl).unwrap();
    let crl_check = Command::new("openssl")
        .args(["crl", "-noout", "-in"])
        .arg(&crl_file)
        .arg("-CAfile")
        .arg(node.ca_bundle())
        .output()
        .unwrap();
    let crl_out = format!(
        "{}{}",
        String::from_utf8_lossy(&crl_check.stdout),
        String::from_utf8_lossy(&crl_check.stderr)
    );
    assert!(
        crl_check.status.success() && crl_out.contains("verify OK"),
        "openssl crl: {crl_out}"
    );
}
