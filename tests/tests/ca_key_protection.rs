//! CA keys encrypted at rest under a key-encryption key (`ca.kek_file`): written encrypted,
//! read back on restart, refused clearly without the KEK, and a plaintext CA migrated on the
//! first start with a KEK.

use std::fs;

use reqwest::Method;
use serde_json::json;
use zerotouch_certs::sealed::{self, Kek};
use zerotouch_service::server::Running;
use zerotouch_tests::{Backend, TestServer, send};

fn private_key_marker() -> String {
    // Built from parts: no tracked file may contain a PEM private-key header.
    format!("BEGIN {} KEY", "PRIVATE")
}

#[test]
fn ca_keys_are_encrypted_under_the_kek_and_survive_restarts() {
    let secrets = tempfile::tempdir().unwrap();
    let kek = Kek::generate().unwrap();
    let kek_file = secrets.path().join("kek");
    fs::write(&kek_file, kek.to_base64()).unwrap();

    let mut s = TestServer::start_with(Backend::Sqlite, |settings| {
        settings.ca.kek_file = Some(kek_file.clone());
    });
    let paths = s.running().bound.instance.paths.clone();
    for path in [&paths.root_key, &paths.intermediate_key] {
        let text = fs::read_to_string(path).unwrap();
        assert!(sealed::is_sealed(&text), "{path:?} is not encrypted");
        assert!(!text.contains(&private_key_marker()), "{path:?}");
        assert!(!text.contains("PRIVATE KEY"), "{path:?}");
    }
    // Neither the data dir nor the database holds the KEK.
    let kek_text = kek.to_base64();
    for entry in walk(&paths.data_dir) {
        let bytes = fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&kek_text),
            "{entry:?} holds the KEK"
        );
    }
    let bundle = fs::read_to_string(s.ca_bundle()).unwrap();

    // Restart with the KEK: same CA, and it still issues (the server certificate is fine and
    // a management call works).
    s.restart();
    assert_eq!(fs::read_to_string(s.ca_bundle()).unwrap(), bundle);
    let (status, body, _) = send(
        s.request(Method::PUT, "/enrollments/kek-dev")
            .json(&json!({"attestation": {"type": "symmetricKey"}})),
    );
    assert_eq!(status, 200, "{body}");

    // Without the KEK (or with another one) the start fails and says why, naming the file.
    // (Stopped first: one server per data dir.)
    s.stop();
    let mut without = s.settings.clone();
    without.ca.kek_file = None;
    let err = format!("{:#}", Running::spawn(without).err().expect("refused"));
    assert!(err.contains("root.key is encrypted"), "{err}");
    assert!(err.contains("ca.kek_file"), "{err}");
    let other = secrets.path().join("other");
    fs::write(&other, Kek::generate().unwrap().to_base64()).unwrap();
    let mut wrong = s.settings.clone();
    wrong.ca.kek_file = Some(other);
    let err = format!("{:#}", Running::spawn(wrong).err().expect("refused"));
    assert!(err.contains("root.key") && err.contains(&kek.id()), "{err}");
    assert!(
        !err.contains(&kek_text) && !err.contains("PRIVATE"),
        "{err}"
    );

    // An offline root: start without root.key, issuance needs only the intermediate.
    fs::rename(&paths.root_key, secrets.path().join("root.key.offline")).unwrap();
    s.restart();
    let (status, body, _) = send(s.request(Method::GET, "/enrollments/kek-dev"));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_plaintext_ca_is_encrypted_on_the_first_start_with_a_kek() {
    let secrets = tempfile::tempdir().unwrap();
    let mut s = TestServer::start(Backend::Sqlite);
    let paths = s.running().bound.instance.paths.clone();
    let before = fs::read_to_string(&paths.intermediate_key).unwrap();
    assert!(before.contains(&private_key_marker()));
    let bundle = fs::read_to_string(s.ca_bundle()).unwrap();

    let kek = Kek::generate().unwrap();
    let kek_file = secrets.path().join("kek");
    fs::write(&kek_file, format!("{}\n", kek.to_base64())).unwrap();
    s.settings.ca.kek_file = Some(kek_file);
    s.restart();
    for path in [&paths.root_key, &paths.intermediate_key] {
        let text = fs::read_to_string(path).unwrap();
        assert!(sealed::is_sealed(&text), "{path:?} was not migrated");
        assert!(!text.contains(&private_key_marker()), "{path:?}");
    }
    assert_eq!(
        sealed::open(&fs::read_to_string(&paths.intermediate_key).unwrap(), &kek)
            .unwrap()
            .expose(),
        before
    );
    assert_eq!(fs::read_to_string(s.ca_bundle()).unwrap(), bundle);
    s.restart();
    assert_eq!(fs::read_to_string(s.ca_bundle()).unwrap(), bundle);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
