//! Rotating the issuing intermediate: `zerotouch ca rotate-intermediate` and
//! `zerotouch ca retire-intermediate`. Both work on the local data dir (and database) and need
//! a restart of every replica to take effect in running processes.
//!
//! Layout of `{data_dir}/ca/`:
//!
//! | File | What |
//! |---|---|
//! | `intermediate.pem`, `intermediate.key` | the current intermediate: it signs everything |
//! | `previous/{time}-{serial}.pem` | earlier intermediates still in the trust bundle (overlap) |
//! | `previous/{time}-{serial}.key` | their keys, kept (encrypted as they were) until retirement |
//! | `retired/{time}-{serial}.pem` | intermediates taken out of the trust bundle |
//!
//! `{time}` is the Unix time of the rotation, zero-padded, so names sort oldest first.
//!
//! **Rotation** signs a new intermediate with the root key (which must be present, so an
//! offline root is brought back for it), moves the current one to `previous/` and writes the new
//! one in its place and the bundle (root, new, previous). After a restart new certificates
//! come from the new intermediate, the server certificate is re-issued from it, and the hub
//! trusts chains to either intermediate.
//!
//! **Retirement** revokes (reason `cessationOfOperation`) every certificate still good that a
//! previous intermediate issued, moves its certificate to `retired/`, deletes its key and
//! rewrites the bundle without it. The revocations are what refuse the old certificates
//! everywhere (DPS, EST, hub MQTT and HTTPS): a device chain through the old intermediate would
//! otherwise still chain to the root.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use zerotouch_certs::revocation::ReasonCode;

use crate::bootstrap;
use crate::config::Settings;
use crate::db::{self, Collection, DocumentStore};
use crate::pki::{Revoked, leaf_identity, revoke_record};

/// The actor recorded in the audit trail for retirement revocations.
pub const RETIRE_ACTOR: &str = "ca:retire-intermediate";

/// Opens the database and loads the instance `serve` created (never creates one).
fn open(settings: &Settings) -> anyhow::Result<(db::Database, bootstrap::Instance)> {
    bootstrap::open_existing(settings)
}

/// Subject (as recorded in `issuer` fields) and serial of a PEM certificate.
fn describe(pem: &str) -> anyhow::Result<(String, String)> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("certificate PEM: {e}"))?;
    let identity = leaf_identity(&block.contents)
        .ok_or_else(|| anyhow::anyhow!("the certificate does not parse"))?;
    Ok((identity.subject, identity.serial))
}

/// `zerotouch ca rotate-intermediate`: see the module docs. Returns what was done, as JSON.
pub fn rotate_intermediate(settings: &Settings) -> anyhow::Result<Value> {
    if settings.ca.pkcs11.is_some() {
        bail!(
            "ca.pkcs11 is set: rotating an intermediate whose key is in a PKCS#11 token is not \
             supported yet (docs/pki.md, \"PKCS#11\")"
        );
    }
    let (store, instance) = open(settings)?;
    let paths = &instance.paths;
    if !paths.root_key.exists() {
        bail!(
            "{} is not present: rotating the intermediate needs the root key; put the offline \
             root key back for the rotation and remove it again afterwards",
            paths.root_key.display()
        );
    }
    let kek = settings.ca_kek()?;
    let generation = 2
        + bootstrap::previous_intermediate_files(paths)?.len()
        + count_pem(&paths.retired_intermediates)?;
    let name = format!("{}, generation {generation}", instance.id_scope);
    let rotated = instance
        .ca
        .rotate_intermediate(&name)
        .context("signing a new intermediate with the root key")?;

    let (old_subject, old_serial) = describe(instance.ca.intermediate_cert_pem())?;
    bootstrap::create_private_dir(&paths.previous_intermediates)?;
    let base = format!("{:012}-{old_serial}", crate::time::now_unix());
    let previous_cert = paths.previous_intermediates.join(format!("{base}.pem"));
    let previous_key = paths.previous_intermediates.join(format!("{base}.key"));
    bootstrap::write_public(&previous_cert, instance.ca.intermediate_cert_pem())?;
    // The old key moves as it is on disk (encrypted or not).
    fs::rename(&paths.intermediate_key, &previous_key).with_context(|| {
        format!(
            "moving {} to {}",
            paths.intermediate_key.display(),
            previous_key.display()
        )
    })?;
    bootstrap::write_ca_key(
        &paths.intermediate_key,
        rotated.intermediate_key_pem(),
        kek.as_ref(),
    )?;
    bootstrap::write_public(&paths.intermediate_cert, rotated.intermediate_cert_pem())?;
    bootstrap::write_public(&paths.ca_bundle, &rotated.trust_bundle_pem())?;
    let (new_subject, new_serial) = describe(rotated.intermediate_cert_pem())?;
    if settings.cluster.enabled() {
        bootstrap::shared_ca::replace(&store, paths)?;
    }
    tracing::info!(
        new = %new_subject,
        previous = %old_subject,
        "rotated the intermediate CA; restart every replica to issue from it"
    );
    Ok(json!({
        "current": {"subject": new_subject, "serial": new_serial},
        "previous": {"subject": old_subject, "serial": old_serial, "file": previous_cert},
        "bundle": paths.ca_bundle,
        "next": "restart every replica; after the overlap, run `zerotouch ca retire-intermediate`",
    }))
}

/// `zerotouch ca retire-intermediate`: see the module docs. Retires every previous
/// intermediate; returns what was done, as JSON.
pub fn retire_intermediate(settings: &Settings) -> anyhow::Result<Value> {
    let (store, instance) = open(settings)?;
    let paths = instance.paths.clone();
    let files = bootstrap::previous_intermediate_files(&paths)?;
    if files.is_empty() {
        bail!(
            "there is no previous intermediate in {} to retire",
            paths.previous_intermediates.display()
        );
    }
    let mut retired = Vec::new();
    for file in files {
        let pem =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let (subject, serial) = describe(&pem)?;
        let revoked = revoke_issued_by(&store, &subject)?;
        bootstrap::create_private_dir(&paths.retired_intermediates)?;
        let name = file.file_name().unwrap_or_default();
        let target = paths.retired_intermediates.join(name);
        fs::rename(&file, &target)
            .with_context(|| format!("moving {} to {}", file.display(), target.display()))?;
        let key = file.with_extension("key");
        if key.exists() {
            fs::remove_file(&key).with_context(|| format!("deleting {}", key.display()))?;
        }
        tracing::info!(%subject, revoked, "retired an intermediate CA");
        retired.push(
            json!({"subject": subject, "serial": serial, "revoked": revoked, "file": target}),
        );
    }
    // Loading again leaves the retired intermediates out; the bundle is rewritten from it.
    drop(instance);
    let (_, instance) = open(settings)?;
    bootstrap::write_public(&instance.paths.ca_bundle, &instance.ca.trust_bundle_pem())?;
    if settings.cluster.enabled() {
        bootstrap::shared_ca::replace(&store, &instance.paths)?;
    }
    Ok(json!({
        "retired": retired,
        "bundle": instance.paths.ca_bundle,
        "next": "restart every replica",
    }))
}

/// Revokes every certificate still good whose recorded issuer is `issuer`; returns how many.
fn revoke_issued_by(store: &dyn DocumentStore, issuer: &str) -> anyhow::Result<usize> {
    let mut count = 0;
    for doc in store.list_all(Collection::IssuedCertificates, None)? {
        let good = doc.body.get("status").and_then(Value::as_str) == Some("good");
        if good
            && doc.body.get("issuer").and_then(Value::as_str) == Some(issuer)
            && let Revoked::Now(_) = revoke_record(
                store,
                &doc.id,
                ReasonCode::CessationOfOperation,
                RETIRE_ACTOR,
            )?
        {
            count += 1;
        }
    }
    Ok(count)
}

fn count_pem(dir: &Path) -> anyhow::Result<usize> {
    if !dir.is_dir() {
        return Ok(0);
    }
    Ok(fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p: &PathBuf| p.extension().is_some_and(|ext| ext == "pem"))
        .count())
}
