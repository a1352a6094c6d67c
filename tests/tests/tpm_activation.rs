//! The activation blob (§3.4) against a real TPM implementation: swtpm with tpm2-tools. The
//! blob built by `attestation::tpm::build_activation` must go through ActivateCredential,
//! Import and Load, and the loaded key's TPM2_HMAC must equal the HMAC computed with the key
//! the server keeps.
//!
//! Needs swtpm and tpm2-tools (`scripts/test` installs them); fails, never skips, without.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};
use ring::hmac;
use zerotouch_attestation::tpm::{
    Activation, build_activation, parse_endorsement_key, parse_public, parse_public_b64,
    parse_storage_root_key,
};
use zerotouch_tests::swtpm::Swtpm;

const EK: &str = "0x81010001";
const SRK: &str = "0x81000001";

fn hmac_b64(key: &[u8], message: &[u8]) -> String {
    STANDARD.encode(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), message))
}

/// The blob's six `T2B` fields, size prefixes included.
fn fields(blob: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = blob;
    let mut out = Vec::new();
    for i in 1..=6 {
        assert!(rest.len() >= 2, "blob truncated at field {i}");
        let len = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        assert!(rest.len() >= len, "blob truncated in field {i}");
        let (field, tail) = rest.split_at(len);
        out.push(field.to_vec());
        rest = tail;
    }
    assert!(rest.is_empty(), "{} bytes after field 6", rest.len());
    out
}

/// Every step with tpm2-tools directly, checking each intermediate result.
#[test]
fn swtpm_activates_imports_and_signs_with_the_wrapped_key() {
    let tpm = Swtpm::start();
    let path = |name: &str| tpm.dir().join(name).display().to_string();
    let flush = || {
        tpm.tool("tpm2_flushcontext", &["-t"]);
    };

    // The device: EK and SRK at the C SDK's handles.
    tpm.tool(
        "tpm2_createek",
        &["-c", EK, "-G", "rsa", "-u", &path("ek.tss"), "-f", "tss"],
    );
    flush();
    tpm.tool(
        "tpm2_createprimary",
        &[
            "-Q",
            "-C",
            "o",
            "-G",
            "rsa2048:aes128cfb",
            "-g",
            "sha256",
            "-a",
            "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
            "-c",
            &path("srk.ctx"),
        ],
    );
    tpm.tool(
        "tpm2_evictcontrol",
        &["-Q", "-C", "o", "-c", &path("srk.ctx"), SRK],
    );
    flush();
    tpm.tool("tpm2_readpublic", &["-Q", "-c", EK, "-o", &path("ek.pub")]);
    tpm.tool(
        "tpm2_readpublic",
        &["-Q", "-c", SRK, "-o", &path("srk.pub")],
    );
    let ek_bytes = std::fs::read(path("ek.pub")).unwrap();
    let srk_bytes = std::fs::read(path("srk.pub")).unwrap();
    let ek = parse_public(&ek_bytes).unwrap();
    let srk = parse_public(&srk_bytes).unwrap();
    // What the service will parse them with accepts them too.
    assert_eq!(
        parse_endorsement_key(&STANDARD.encode(&ek_bytes)).unwrap(),
        ek
    );
    assert_eq!(
        parse_storage_root_key(&STANDARD.encode(&srk_bytes)).unwrap(),
        srk
    );
    // The name tpm2-tools computes is ours.
    tpm.tool(
        "tpm2_readpublic",
        &["-Q", "-c", SRK, "-n", &path("srk.name")],
    );
    assert_eq!(std::fs::read(path("srk.name")).unwrap(), srk.name);

    // The server.
    let activation: Activation = build_activation(&ek, &srk).unwrap();
    let f = fields(&activation.blob);
    let sizes: Vec<usize> = f.iter().map(Vec::len).collect();
    assert_eq!(sizes, [54, 258, 144, 258, 50, 2]);

    // ActivateCredential (activate = SRK, key = EK with PolicySecret(ENDORSEMENT)).
    let mut credential = hex::decode("badcc0de00000001").unwrap();
    credential.extend(&f[0]);
    credential.extend(&f[1]);
    std::fs::write(path("cred.in"), &credential).unwrap();
    tpm.tool(
        "tpm2_startauthsession",
        &["-Q", "--policy-session", "-S", &path("session.ctx")],
    );
    tpm.tool(
        "tpm2_policysecret",
        &["-Q", "-S", &path("session.ctx"), "-c", "e"],
    );
    let session = format!("session:{}", path("session.ctx"));
    tpm.tool(
        "tpm2_activatecredential",
        &[
            "-Q",
            "-c",
            SRK,
            "-C",
            EK,
            "-i",
            &path("cred.in"),
            "-o",
            &path("inner.key"),
            "-P",
            &session,
        ],
    );
    tpm.tool("tpm2_flushcontext", &[&path("session.ctx")]);
    flush();
    let inner = std::fs::read(path("inner.key")).unwrap();
    assert_eq!(
        inner.len(),
        16,
        "the credential is the 16-byte inner wrapper key"
    );

    // Import, load, HMAC.
    for (i, name) in [(2, "key.dup"), (3, "key.seed"), (4, "key.pub")] {
        std::fs::write(path(name), &f[i]).unwrap();
    }
    tpm.tool(
        "tpm2_import",
        &[
            "-Q",
            "-C",
            SRK,
            "-u",
            &path("key.pub"),
            "-i",
            &path("key.dup"),
            "-s",
            &path("key.seed"),
            "-k",
            &path("inner.key"),
            "-r",
            &path("key.priv"),
        ],
    );
    flush();
    tpm.tool(
        "tpm2_load",
        &[
            "-Q",
            "-C",
            SRK,
            "-u",
            &path("key.pub"),
            "-r",
            &path("key.priv"),
            "-c",
            &path("key.ctx"),
            "-n",
            &path("key.name"),
        ],
    );
    assert_eq!(
        std::fs::read(path("key.name")).unwrap(),
        [&[0x00, 0x0b][..], digest(&SHA256, &f[4][2..]).as_ref()].concat(),
    );
    flush();
    let message = b"0ne00000001%2fregistrations%2fdevice-1\n1700000000";
    std::fs::write(path("message"), message).unwrap();
    tpm.tool(
        "tpm2_hmac",
        &[
            "-c",
            &path("key.ctx"),
            "-g",
            "sha256",
            "-o",
            &path("hmac.out"),
            &path("message"),
        ],
    );
    let tpm_hmac = std::fs::read(path("hmac.out")).unwrap();
    assert_eq!(
        STANDARD.encode(tpm_hmac),
        hmac_b64(&activation.hmac_key, message)
    );
    assert_eq!(
        STANDARD.decode(activation.hmac_key_base64()).unwrap(),
        activation.hmac_key
    );
}

/// `tests/tpm/device.sh` the way the end-to-end test drives it: init → import → sign, twice
/// (a second blob replaces the persistent key, as the `assigned` answer's fresh blob does).
#[test]
fn device_script_imports_and_signs() {
    let tpm = Swtpm::start();
    let (ek_b64, srk_b64) = tpm.device_init();
    let ek = parse_endorsement_key(&ek_b64).unwrap();
    let srk = parse_storage_root_key(&srk_b64).unwrap();
    let registration_id =
        std::fs::read_to_string(tpm.device_state().join("registration_id")).unwrap();
    assert_eq!(registration_id, ek.registration_id());

    // init again keeps the keys.
    assert_eq!(tpm.device_init(), (ek_b64.clone(), srk_b64.clone()));
    assert_eq!(parse_public_b64(&srk_b64).unwrap(), srk);

    let string_to_sign = "0ne00000001%2fregistrations%2fdevice-1\n1700000000";
    let first = build_activation(&ek, &srk).unwrap();
    tpm.device_import(&first.blob_base64());
    assert_eq!(
        tpm.device_sign(string_to_sign),
        hmac_b64(&first.hmac_key, string_to_sign.as_bytes())
    );

    let second = build_activation(&ek, &srk).unwrap();
    tpm.device_import(&second.blob_base64());
    let signature = tpm.device_sign(string_to_sign);
    assert_eq!(
        signature,
        hmac_b64(&second.hmac_key, string_to_sign.as_bytes())
    );
    assert_ne!(
        signature,
        hmac_b64(&first.hmac_key, string_to_sign.as_bytes())
    );

    // The TPM checks the blob's integrity: a flipped byte in the credential (field 1), the
    // duplicate (field 3) or the public area (field 5) is refused, and the key in place stays.
    let third = build_activation(&ek, &srk).unwrap();
    for (offset, refused_by) in [
        (10, "tpm2_activatecredential"),
        (54 + 258 + 60, "tpm2_import"),
        (third.blob.len() - 10, "tpm2_import"),
    ] {
        let mut tampered = third.blob.clone();
        tampered[offset] ^= 0x01;
        let error = tpm
            .try_device(&["import", &STANDARD.encode(&tampered)])
            .expect_err("a tampered blob was accepted");
        assert!(
            error.contains(refused_by) && error.contains("integrity check failed"),
            "byte {offset}: {error}"
        );
    }
    assert!(tpm.try_device(&["import", "not base64!"]).is_err());
    let truncated = STANDARD.encode(&third.blob[..100]);
    assert!(tpm.try_device(&["import", &truncated]).is_err());
    assert_eq!(tpm.device_sign(string_to_sign), signature);
}
