//! `zerotouch ca import-to-pkcs11`: moves the intermediate CA key from `ca/intermediate.key`
//! into the PKCS#11 token of `ca.pkcs11`, after which the service signs in the token.
//!
//! The key is created in the token as a sensitive, non-extractable signing key (with its
//! public key next to it, same `CKA_LABEL` and `CKA_ID`); the import is checked against
//! `ca/intermediate.pem` before the key file is deleted, or moved aside with `--move-key-to`.

use std::fs;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use zerotouch_certs::CaHierarchy;
use zerotouch_certs::pkcs11;

use crate::bootstrap::{self, Paths};
use crate::config::Settings;

/// Imports `ca/intermediate.key` (decrypted with the KEK if it is sealed) into the token and
/// deletes the file, or moves it to `move_key_to` (which must not exist). Works on the local
/// data dir; restart every replica afterwards (they then need `ca.pkcs11` and the token).
pub fn import_to_pkcs11(settings: &Settings, move_key_to: Option<&Path>) -> anyhow::Result<Value> {
    let Some(p11) = &settings.ca.pkcs11 else {
        bail!("ca.pkcs11 is not configured: set module, token_label and the PIN first");
    };
    let paths = Paths::new(&settings.service.data_dir);
    if !paths.intermediate_key.exists() {
        bail!(
            "{} does not exist: nothing to import (is the key already in the token?)",
            paths.intermediate_key.display()
        );
    }
    if let Some(target) = move_key_to
        && target.exists()
    {
        bail!("{} exists: choose a new path", target.display());
    }
    let kek = settings.ca_kek()?;
    let (key, _) = bootstrap::read_ca_key(&paths.intermediate_key, kek.as_ref())?;
    let root_cert = fs::read_to_string(&paths.root_cert)
        .with_context(|| format!("reading {}", paths.root_cert.display()))?;
    let intermediate_cert = fs::read_to_string(&paths.intermediate_cert)
        .with_context(|| format!("reading {}", paths.intermediate_cert.display()))?;
    // The key must be the intermediate's before it goes anywhere.
    CaHierarchy::from_pem(&root_cert, None, &intermediate_cert, &key)
        .context("checking the key file against ca/intermediate.pem")?;
    let imported = bootstrap::with_token(p11, |token| {
        pkcs11::import_p256_key(token, &p11.key_label, &key).with_context(|| {
            format!(
                "importing the intermediate key into PKCS#11 token {:?} ({})",
                p11.token_label,
                p11.module.display()
            )
        })
    })?;
    CaHierarchy::from_pem_with_token_key(&root_cert, None, &intermediate_cert, imported)
        .context("checking the imported key against ca/intermediate.pem")?;
    let key_file = match move_key_to {
        Some(target) => {
            fs::rename(&paths.intermediate_key, target).with_context(|| {
                format!(
                    "moving {} to {}",
                    paths.intermediate_key.display(),
                    target.display()
                )
            })?;
            json!({"movedTo": target.display().to_string()})
        }
        None => {
            fs::remove_file(&paths.intermediate_key)
                .with_context(|| format!("deleting {}", paths.intermediate_key.display()))?;
            json!({"deleted": paths.intermediate_key.display().to_string()})
        }
    };
    tracing::info!(
        token_label = %p11.token_label,
        key_label = %p11.key_label,
        "imported the intermediate key into the PKCS#11 token"
    );
    Ok(json!({
        "tokenLabel": p11.token_label,
        "keyLabel": p11.key_label,
        "keyFile": key_file,
    }))
}
