//! Replica mode's CA: the files of `ca/` are also kept in the shared database (the keys sealed
//! under the key-encryption key, exactly as on disk), so that a replica started with an empty
//! data dir, the shared database and the same KEK runs with the same CA, without copying
//! files. `bootstrap::bootstrap` calls [`restore`] before it loads or creates the CA, and
//! [`publish`] after.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::{Paths, create_private_dir, write_atomic};
use crate::db::DocumentStore;

/// The setting that holds the CA files: a JSON object, path under `ca/` → file text.
const SETTING: &str = "ca_files";

/// Derived from the others and rewritten at every start.
const DERIVED: &[&str] = &["bundle.pem"];

fn ca_dir(paths: &Paths) -> PathBuf {
    paths
        .root_cert
        .parent()
        .unwrap_or(&paths.data_dir)
        .to_path_buf()
}

/// The files under `ca/`, by path relative to it.
fn read_files(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(base, &path, out)?;
                continue;
            }
            let relative = path
                .strip_prefix(base)
                .context("a CA file outside ca/")?
                .to_string_lossy()
                .into_owned();
            if DERIVED.contains(&relative.as_str()) {
                continue;
            }
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            out.insert(relative, text);
        }
        Ok(())
    }
    let mut files = BTreeMap::new();
    if dir.is_dir() {
        walk(dir, dir, &mut files)?;
    }
    Ok(files)
}

/// Whether the stored files hold the same CA as `ours`: the same root and intermediate
/// certificates (sealed keys differ from one sealing to the next).
fn same_ca(stored: &BTreeMap<String, String>, ours: &BTreeMap<String, String>) -> bool {
    ["root.pem", "intermediate.pem"]
        .iter()
        .all(|name| stored.get(*name) == ours.get(*name))
}

/// Writes the shared CA files into an empty `ca/`; `false` when the database holds none yet.
pub fn restore(store: &dyn DocumentStore, paths: &Paths) -> anyhow::Result<bool> {
    let Some(text) = store.setting_get(SETTING)? else {
        return Ok(false);
    };
    let files: BTreeMap<String, String> =
        serde_json::from_str(&text).context("reading the shared CA files from the database")?;
    let dir = ca_dir(paths);
    create_private_dir(&dir)?;
    for (relative, text) in &files {
        if relative
            .split('/')
            .any(|part| part == ".." || part.is_empty())
        {
            bail!("the shared CA files name a path outside ca/: {relative:?}");
        }
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            create_private_dir(parent)?;
        }
        write_atomic(&path, text.as_bytes(), 0o600)?;
    }
    tracing::info!(path = %dir.display(), "restored the replicas' shared CA from the database");
    Ok(true)
}

/// Stores `ca/` in the database if it holds no CA yet, and checks that this data dir's CA
/// is the shared one. When it is not, the shared one replaces it, and `Ok(true)` asks the
/// caller to load it again:
/// - `created` (this start created the CA): another replica shared its CA first (replicas
///   started together);
/// - the same root: another replica rotated or retired an intermediate ([`replace`]).
///
/// A data dir with another root is refused.
pub fn publish(store: &dyn DocumentStore, paths: &Paths, created: bool) -> anyhow::Result<bool> {
    let dir = ca_dir(paths);
    let ours = read_files(&dir)?;
    let text = serde_json::to_string(&ours)?;
    let stored_text = store
        .setting_init(SETTING, &text)
        .context("storing the shared CA files")?;
    let stored: BTreeMap<String, String> = serde_json::from_str(&stored_text)
        .context("reading the shared CA files from the database")?;
    if same_ca(&stored, &ours) {
        return Ok(false);
    }
    let same_root = stored.get("root.pem") == ours.get("root.pem");
    if !created && !same_root {
        bail!(
            "the CA in {} is not the CA the replicas share in the database: a replica's data \
             dir must start empty (or hold the shared CA); move {} away and start again",
            dir.display(),
            dir.display()
        );
    }
    if created {
        tracing::info!("another replica shared its CA first; using it");
    } else {
        tracing::info!("the replicas' CA changed its intermediates (a rotation); using it");
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    restore(store, paths)?;
    Ok(true)
}

/// After `zerotouch ca rotate-intermediate` or `retire-intermediate` on one replica: the
/// database's copy becomes this data dir's `ca/`, which the other replicas take at their next
/// start ([`publish`]).
pub fn replace(store: &dyn DocumentStore, paths: &Paths) -> anyhow::Result<()> {
    let files = read_files(&ca_dir(paths))?;
    store
        .setting_set(SETTING, &serde_json::to_string(&files)?)
        .context("storing the shared CA files")?;
    Ok(())
}
