//! The intermediate CA key in a PKCS#11 token (SoftHSM2): imported with
//! `zerotouch ca import-to-pkcs11`, the key file gone, and after a restart with `ca.pkcs11`
//! a device registering with a CSR gets a certificate that `openssl verify` accepts, and the
//! CRL (signed in the token) verifies too.
//!
//! SoftHSM2 finds its token directory through `SOFTHSM2_CONF`, read by the library in this
//! process (the server runs in-process). The crates forbid `unsafe` code, so the environment
//! of this process cannot be changed: the test runs the real work in a child process (this
//! same test executable, running the ignored `token_issuance_in_child`) with the variable set.

use std::fs;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::Method;
use serde_json::json;
use zerotouch_service::config::Pkcs11Settings;
use zerotouch_tests::{Backend, TestServer, c_sdk_device_sas, pki, send};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const CHILD_MARKER: &str = "ZEROTOUCH_TEST_PKCS11_CHILD";

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

    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "token_issuance_in_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_MARKER, &pin_file)
        .output()
        .unwrap();
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the token test failed:\n{log}");
    assert!(
        log.contains("1 passed"),
        "the token test did not run:\n{log}"
    );
}

/// Run by [`issuance_works_with_the_intermediate_key_in_softhsm2`] with `SOFTHSM2_CONF` set.
#[test]
#[ignore = "runs as a child of issuance_works_with_the_intermediate_key_in_softhsm2"]
fn token_issuance_in_child() {
    let pin_file = std::env::var_os(CHILD_MARKER)
        .expect("run through issuance_works_with_the_intermediate_key_in_softhsm2");
    let p11 = Pkcs11Settings {
        module: MODULE.into(),
        token_label: "zt".into(),
        key_label: "zerotouch-intermediate".into(),
        pin_file: Some(pin_file.into()),
    };

    // First start: a plain CA with the key in ca/intermediate.key.
    let mut s = TestServer::start(Backend::Sqlite);
    let paths = s.running().bound.instance.paths.clone();
    assert!(paths.intermediate_key.exists());
    let bundle_before = fs::read_to_string(s.ca_bundle()).unwrap();

    // Without ca.pkcs11 the import refuses; with it, the key goes into the token and the
    // file goes away.
    assert!(zerotouch_service::pki::token::import_to_pkcs11(&s.settings, None).is_err());
    s.settings.ca.pkcs11 = Some(p11);
    let report = zerotouch_service::pki::token::import_to_pkcs11(&s.settings, None).unwrap();
    assert_eq!(report["keyLabel"], "zerotouch-intermediate", "{report}");
    assert!(!paths.intermediate_key.exists(), "the key file is deleted");
    // A second import has nothing to import.
    assert!(zerotouch_service::pki::token::import_to_pkcs11(&s.settings, None).is_err());
    // Restart with the key in the token only.
    s.restart();
    assert!(s.running().bound.instance.ca.intermediate_key_in_token());
    assert_eq!(fs::read_to_string(s.ca_bundle()).unwrap(), bundle_before);

    // A device registers with a CSR and gets a certificate signed in the token.
    let id = "p11-device";
    let (status, body, _) = send(
        s.request(Method::PUT, &format!("/enrollments/{id}"))
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{body}");
    let key = body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let token = c_sdk_device_sas(
        &s.id_scope,
        id,
        &key,
        zerotouch_service::time::now_unix() + 600,
    );
    let (csr, _device_key) = pki::csr(id);
    let request = json!({"registrationId": id, "csr": B64.encode(&csr)});
    let state = s.register_and_poll(&s.client, id, Some(&token), &request);
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
        .arg(s.ca_bundle())
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
    let crl = s
        .client
        .get(format!(
            "https://localhost:{}/crl?format=pem",
            s.https_port()
        ))
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
        .arg(s.ca_bundle())
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
