//! First start and every start after it.
//!
//! On first start this creates the data dir, the database, the ID scope, the CA hierarchy, a TLS
//! server certificate for the configured hostnames, the owner authorization policy and the
//! bearer-token secret. Later starts reuse all of it; the server certificate alone is re-issued
//! when the configured hostnames change or it nears expiry.
//!
//! Instance-wide values (ID scope, policies, token secret) live in the database, so replicas
//! sharing one PostgreSQL database agree on them. CA and TLS keys live in the data dir, written
//! with mode 0600. Replicas share the data dir's `ca/` folder, or, in replica mode
//! (`[cluster]`), take it from the database ([`shared_ca`]).

pub mod shared_ca;

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use zerotouch_attestation::symmetric_key;
use zerotouch_certs::pkcs11::{Pkcs11Key, Token};
use zerotouch_certs::sealed::{self, Kek};
use zerotouch_certs::{CaHierarchy, SecretPem};

use crate::auth::{self, AuthorizationPolicy, OWNER_POLICY, Rights};
use crate::config::{CA_KEK_ENV, Pkcs11Settings, Settings};
use crate::db::{Collection, DocumentStore, StoreError, Write};

const ID_SCOPE_KEY: &str = "id_scope";
/// Setting that holds the bearer-token signing secret (read on every request, so a rotation
/// takes effect on every replica at once).
pub const TOKEN_SECRET_KEY: &str = "token_secret";
const SERVER_CERT_DAYS: u32 = 397;

/// Files under the data dir.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    pub intermediate_cert: PathBuf,
    pub intermediate_key: PathBuf,
    /// Earlier intermediates still trusted after a rotation (`{time}-{serial}.pem`, and their
    /// keys `.key` until retirement).
    pub previous_intermediates: PathBuf,
    /// Intermediates retired from the trust bundle (certificates only, for the record).
    pub retired_intermediates: PathBuf,
    /// Root + intermediate (+ previous intermediates): what clients install to trust the
    /// service.
    pub ca_bundle: PathBuf,
    /// Server leaf + intermediate, presented on every TLS listener.
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path) -> Paths {
        let ca = data_dir.join("ca");
        let tls = data_dir.join("tls");
        Paths {
            data_dir: data_dir.to_path_buf(),
            root_cert: ca.join("root.pem"),
            root_key: ca.join("root.key"),
            intermediate_cert: ca.join("intermediate.pem"),
            intermediate_key: ca.join("intermediate.key"),
            previous_intermediates: ca.join("previous"),
            retired_intermediates: ca.join("retired"),
            ca_bundle: ca.join("bundle.pem"),
            server_chain: tls.join("server.pem"),
            server_key: tls.join("server.key"),
        }
    }
}

/// Everything a running instance knows about itself.
pub struct Instance {
    pub id_scope: String,
    /// The token secret as of start; requests read the current one from the database.
    pub token_secret: String,
    pub ca: CaHierarchy,
    pub paths: Paths,
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("id_scope", &self.id_scope)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// Creates what is missing and loads the rest. Safe to run concurrently on replicas that share
/// the database: every instance-wide value is written insert-if-absent.
pub fn bootstrap(settings: &Settings, store: &dyn DocumentStore) -> anyhow::Result<Instance> {
    let paths = Paths::new(&settings.service.data_dir);
    prepare_data_dir(settings)?;
    restrict_sqlite_files(settings)?;
    create_private_dir(paths.server_chain.parent().unwrap_or(&paths.data_dir))?;

    let id_scope = store
        .setting_init(ID_SCOPE_KEY, &new_id_scope())
        .context("storing the ID scope")?;
    let token_secret = store
        .setting_init(TOKEN_SECRET_KEY, &auth::generate_token_secret())
        .context("storing the token secret")?;
    ensure_owner_policy(store)?;
    crate::hub::auth::ensure_policies(store).context("creating the hub policies")?;

    let kek = settings.ca_kek()?;
    let replica = settings.cluster.enabled();
    if replica && kek.is_none() {
        bail!(
            "replica mode (cluster.nats_url) keeps the CA keys in the shared database, sealed: \
             set the same key-encryption key on every replica (ca.kek_file or {CA_KEK_ENV})"
        );
    }
    // A replica's empty data dir takes the shared CA; otherwise this start creates one.
    let restored =
        replica && !paths.intermediate_cert.exists() && shared_ca::restore(store, &paths)?;
    let created = !restored && !paths.intermediate_cert.exists();
    let load = || match &settings.ca.pkcs11 {
        Some(p11) => load_ca_with_token_key(&paths, p11, kek.as_ref()),
        None => load_or_create_ca(&paths, &id_scope, kek.as_ref()),
    };
    let mut ca = load()?;
    if replica && shared_ca::publish(store, &paths, created)? {
        ca = load()?;
    }
    write_public(&paths.ca_bundle, &ca.trust_bundle_pem())?;
    ensure_server_certificate(&paths, &ca, &settings.service.hostnames)?;

    Ok(Instance {
        id_scope,
        token_secret,
        ca,
        paths,
    })
}

/// The instance `serve` created in the data dir and database of `settings`, for the CLI's local
/// verbs (`credentials`, `token`, `hub join-token`, `ca rotate-intermediate`, …): only `serve`
/// creates a data dir, a database, a CA or a key. This creates nothing and rewrites no file;
/// what is missing is an error naming the path looked at and the likely fix (usually the
/// server's `--config`). Pending migrations are applied to an existing instance's database, as
/// after an upgrade. The pool keeps no background connection (a short-lived process).
pub fn open_existing(settings: &Settings) -> anyhow::Result<(crate::db::Database, Instance)> {
    let dir = &settings.service.data_dir;
    const START: &str = "create the instance by starting the server once with `zerotouch serve`";
    if !dir.is_dir() {
        bail!(
            "no Zerotouch data dir at {}: pass the --config (or --data-dir) the server runs \
             with, or {START}",
            dir.display()
        );
    }
    let url = settings.database_url()?;
    let options = crate::db::Options {
        keep_warm: false,
        ..crate::db::Options::default()
    };
    let found = crate::db::has_setting(&url, ID_SCOPE_KEY, options.connection_timeout)
        .context("opening the database")?;
    if !found {
        let configured = settings.database.url.is_some() || settings.database.url_file.is_some();
        match url.strip_prefix("sqlite://") {
            Some(path) if !configured => bail!(
                "no Zerotouch database at {path} (the default when database.url is unset): if the \
                 server keeps its database elsewhere (database.url, e.g. PostgreSQL), pass its \
                 --config or set ZEROTOUCH__DATABASE__URL; otherwise {START}"
            ),
            Some(path) => bail!(
                "no Zerotouch instance in the SQLite database {path} (database.url): check \
                 database.url against the server's configuration, or {START}"
            ),
            None => bail!(
                "the PostgreSQL database of database.url holds no Zerotouch instance (no ID \
                 scope): check database.url against the server's configuration, or {START}"
            ),
        }
    }
    let store = crate::db::open_with(&url, &options).context("opening the database")?;
    let instance = load_existing(settings, &store)?;
    Ok((store, instance))
}

/// Loads what [`bootstrap`] created, creating and rewriting nothing.
fn load_existing(settings: &Settings, store: &dyn DocumentStore) -> anyhow::Result<Instance> {
    let paths = Paths::new(&settings.service.data_dir);
    let id_scope = store
        .setting_get(ID_SCOPE_KEY)?
        .context("the database holds no ID scope: start the server once with `zerotouch serve`")?;
    let token_secret = store.setting_get(TOKEN_SECRET_KEY)?.context(
        "the database holds no token secret: start the server once with `zerotouch serve`",
    )?;
    if !paths.intermediate_cert.exists() {
        bail!(
            "no CA at {}: the data dir {} does not belong to this database's instance (pass the \
             --config or --data-dir the server runs with), or restore the CA files",
            paths.intermediate_cert.display(),
            paths.data_dir.display()
        );
    }
    let kek = settings.ca_kek()?;
    let ca = match &settings.ca.pkcs11 {
        Some(p11) => load_ca_with_token_key(&paths, p11, kek.as_ref())?,
        None => load_ca(&paths, kek.as_ref())?.ca,
    };
    Ok(Instance {
        id_scope,
        token_secret,
        ca,
        paths,
    })
}

/// Creates the data dir readable by its owner only, before anything (the database) writes
/// into it. An existing data dir is tightened to 0700: it holds the database with every key.
pub fn prepare_data_dir(settings: &Settings) -> anyhow::Result<()> {
    let dir = &settings.service.data_dir;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// The SQLite database holds policy and device keys: owner-only, like the key files. SQLite
/// gives its -wal and -shm files the database file's mode.
fn restrict_sqlite_files(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database_url()?;
    let Some(path) = url.strip_prefix("sqlite://") else {
        return Ok(());
    };
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{path}{suffix}"));
        if file.exists() {
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", file.display()))?;
        }
    }
    Ok(())
}

/// `0ne` + 8 hex digits, as Azure DPS formats ID scopes.
fn new_id_scope() -> String {
    let bytes: [u8; 4] = rand::random();
    format!("0ne{}", hex::encode_upper(bytes))
}

fn ensure_owner_policy(store: &dyn DocumentStore) -> anyhow::Result<()> {
    if store
        .get(Collection::AuthorizationPolicies, OWNER_POLICY)?
        .is_some()
    {
        return Ok(());
    }
    let policy = AuthorizationPolicy {
        key_name: OWNER_POLICY.into(),
        primary_key: symmetric_key::generate_key()?,
        secondary_key: symmetric_key::generate_key()?,
        rights: Rights::ALL.to_string(),
    };
    let body = serde_json::to_value(&policy)?;
    match store.put(
        Collection::AuthorizationPolicies,
        OWNER_POLICY,
        None,
        &body,
        Write::Create,
    ) {
        Ok(_) | Err(StoreError::Conflict) => Ok(()),
        Err(e) => Err(e).context("creating the owner policy"),
    }
}

/// The hub's `iothubowner` policy, for `zerotouch credentials`.
pub fn hub_owner_policy(store: &dyn DocumentStore) -> anyhow::Result<AuthorizationPolicy> {
    crate::hub::auth::policy(store, crate::hub::auth::OWNER)?
        .context("the iothubowner policy is missing")
}

/// The owner policy, for `zerotouch credentials`.
pub fn owner_policy(store: &dyn DocumentStore) -> anyhow::Result<AuthorizationPolicy> {
    let doc = store
        .get(Collection::AuthorizationPolicies, OWNER_POLICY)?
        .context("the owner policy is missing")?;
    Ok(serde_json::from_value::<AuthorizationPolicy>(doc.body)?)
}

/// Loads the CA from `ca/`, or creates it. With a KEK, the CA keys are written encrypted,
/// and a plaintext key found on disk is encrypted in place once the CA has loaded.
fn load_or_create_ca(
    paths: &Paths,
    id_scope: &str,
    kek: Option<&Kek>,
) -> anyhow::Result<CaHierarchy> {
    if paths.intermediate_cert.exists() {
        let loaded = load_ca(paths, kek)?;
        if let Some(kek) = kek {
            for (path, key) in &loaded.plaintext_keys {
                write_ca_key(path, key, Some(kek))?;
                tracing::info!(
                    path = %path.display(),
                    kek_id = %kek.id(),
                    "encrypted a plaintext CA key under the key-encryption key"
                );
            }
        }
        return Ok(loaded.ca);
    }
    let ca_dir = paths
        .root_cert
        .parent()
        .unwrap_or(&paths.data_dir)
        .to_path_buf();
    if paths.root_cert.exists() {
        bail!(
            "{} exists but {} does not: restore the CA files or move the data dir away",
            paths.root_cert.display(),
            paths.intermediate_cert.display()
        );
    }
    // Build the CA in a private temporary folder and move it into place with one rename, so
    // replicas that share the folder and start together end up with one complete CA: the
    // loser's rename fails (the folder exists and is not empty) and it loads the winner's.
    let ca = CaHierarchy::generate(id_scope).context("generating the CA hierarchy")?;
    let staging = paths.data_dir.join(format!(
        ".ca-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 4]>())
    ));
    create_private_dir(&staging)?;
    let in_staging = |p: &Path| staging.join(p.file_name().unwrap_or_default());
    if let Some(root_key) = ca.root_key_pem() {
        write_ca_key(&in_staging(&paths.root_key), root_key, kek)?;
    }
    write_ca_key(
        &in_staging(&paths.intermediate_key),
        ca.intermediate_key_pem(),
        kek,
    )?;
    write_public(&in_staging(&paths.root_cert), ca.root_cert_pem())?;
    write_public(
        &in_staging(&paths.intermediate_cert),
        ca.intermediate_cert_pem(),
    )?;
    if ca_dir.is_dir() && fs::read_dir(&ca_dir)?.next().is_none() {
        let _ = fs::remove_dir(&ca_dir);
    }
    if let Err(e) = fs::rename(&staging, &ca_dir) {
        let _ = fs::remove_dir_all(&staging);
        if paths.intermediate_cert.exists() {
            tracing::info!("another instance created the CA first; using it");
            return load_or_create_ca(paths, id_scope, kek);
        }
        return Err(e).with_context(|| format!("moving the new CA into {}", ca_dir.display()));
    }
    tracing::info!(path = %paths.root_cert.display(), "created a new CA hierarchy");
    Ok(ca)
}

/// A CA read from `ca/`, and its keys found in plaintext although a KEK is configured.
struct LoadedCa {
    ca: CaHierarchy,
    plaintext_keys: Vec<(PathBuf, SecretPem)>,
}

/// Reads the CA from `ca/` (keys opened with the KEK when sealed); writes nothing.
fn load_ca(paths: &Paths, kek: Option<&Kek>) -> anyhow::Result<LoadedCa> {
    let root_cert = read(&paths.root_cert)?;
    let root_key = if paths.root_key.exists() {
        Some(read_ca_key(&paths.root_key, kek)?)
    } else {
        None
    };
    let intermediate_cert = read(&paths.intermediate_cert)?;
    let intermediate_key = read_ca_key(&paths.intermediate_key, kek)?;
    let ca = CaHierarchy::from_pem(
        &root_cert,
        root_key.as_ref().map(|(key, _)| key),
        &intermediate_cert,
        &intermediate_key.0,
    )
    .with_context(|| format!("loading the CA from {}", paths.root_cert.display()))?
    .with_previous_intermediates(&read_previous_intermediates(paths)?)
    .with_context(|| {
        format!(
            "loading the previous intermediates from {}",
            paths.previous_intermediates.display()
        )
    })?;
    let mut plaintext_keys = Vec::new();
    if kek.is_some() {
        for (path, key) in [
            (&paths.root_key, root_key),
            (&paths.intermediate_key, Some(intermediate_key)),
        ] {
            if let Some((key, false)) = key {
                plaintext_keys.push((path.clone(), key));
            }
        }
    }
    Ok(LoadedCa { ca, plaintext_keys })
}

/// Loads the CA from `ca/` with the intermediate key in the PKCS#11 token of `ca.pkcs11`:
/// `ca/intermediate.key` is not read (and should not exist). Never creates a CA: the first
/// start runs without `ca.pkcs11`, then `zerotouch ca import-to-pkcs11` moves the key.
fn load_ca_with_token_key(
    paths: &Paths,
    p11: &Pkcs11Settings,
    kek: Option<&Kek>,
) -> anyhow::Result<CaHierarchy> {
    if !paths.intermediate_cert.exists() {
        bail!(
            "ca.pkcs11 is set but {} does not exist: start once without ca.pkcs11 to create the \
             CA, then run `zerotouch ca import-to-pkcs11`",
            paths.intermediate_cert.display()
        );
    }
    if paths.intermediate_key.exists() {
        tracing::warn!(
            path = %paths.intermediate_key.display(),
            "ca.pkcs11 is set: the intermediate key in the token is used; delete this key file"
        );
    }
    let root_cert = read(&paths.root_cert)?;
    let root_key = if paths.root_key.exists() {
        Some(read_ca_key(&paths.root_key, kek)?.0)
    } else {
        None
    };
    let intermediate_cert = read(&paths.intermediate_cert)?;
    let key = open_token_key(p11)?;
    CaHierarchy::from_pem_with_token_key(&root_cert, root_key.as_ref(), &intermediate_cert, key)
        .with_context(|| {
            format!(
                "loading the CA from {} with the intermediate key in the PKCS#11 token",
                paths.root_cert.display()
            )
        })?
        .with_previous_intermediates(&read_previous_intermediates(paths)?)
        .with_context(|| {
            format!(
                "loading the previous intermediates from {}",
                paths.previous_intermediates.display()
            )
        })
}

/// The `Token` of `ca.pkcs11`, with its PIN, handed to `f`.
pub(crate) fn with_token<T>(
    p11: &Pkcs11Settings,
    f: impl FnOnce(Token<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let pin = p11.pin()?;
    f(Token {
        module: &p11.module,
        token_label: &p11.token_label,
        pin: pin.expose(),
    })
}

/// Opens the intermediate key `ca.pkcs11.key_label` in its token.
fn open_token_key(p11: &Pkcs11Settings) -> anyhow::Result<Pkcs11Key> {
    with_token(p11, |token| {
        Pkcs11Key::open(token, &p11.key_label).with_context(|| {
            format!(
                "opening the intermediate key {:?} in PKCS#11 token {:?} ({})",
                p11.key_label,
                p11.token_label,
                p11.module.display()
            )
        })
    })
}

fn ensure_server_certificate(
    paths: &Paths,
    ca: &CaHierarchy,
    hostnames: &[String],
) -> anyhow::Result<()> {
    if paths.server_chain.exists() && paths.server_key.exists() {
        let chain = read(&paths.server_chain)?;
        let current = zerotouch_certs::server_certificate_covers(&chain, hostnames)
            .unwrap_or(false)
            && chain.contains(ca.intermediate_cert_pem().trim());
        if current {
            return Ok(());
        }
        tracing::info!("re-issuing the server certificate for {hostnames:?}");
    }
    let issued = ca
        .issue_server_certificate(hostnames, SERVER_CERT_DAYS)
        .context("issuing the server certificate")?;
    write_secret(&paths.server_key, &issued.private_key)?;
    write_public(&paths.server_chain, &issued.chain_pem)?;
    Ok(())
}

/// The certificates in `ca/previous/`, newest first (file names start with the time of the
/// rotation). No folder: none.
pub(crate) fn read_previous_intermediates(paths: &Paths) -> anyhow::Result<Vec<String>> {
    previous_intermediate_files(paths)?
        .iter()
        .map(|path| read(path))
        .collect()
}

/// The `*.pem` files in `ca/previous/`, newest first.
pub(crate) fn previous_intermediate_files(paths: &Paths) -> anyhow::Result<Vec<PathBuf>> {
    let dir = &paths.previous_intermediates;
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "pem"))
        .collect();
    files.sort();
    files.reverse();
    Ok(files)
}

/// Reads a CA private key file: plaintext PEM, or a `ZEROTOUCH ENCRYPTED KEY` opened with the
/// KEK. Returns the key and whether it was encrypted on disk. Errors name the file and the
/// KEK's id, never key material.
pub(crate) fn read_ca_key(path: &Path, kek: Option<&Kek>) -> anyhow::Result<(SecretPem, bool)> {
    let text = read(path)?;
    if !sealed::is_sealed(&text) {
        return Ok((SecretPem::new(text), false));
    }
    let Some(kek) = kek else {
        bail!(
            "{} is encrypted, but no key-encryption key is configured: set ca.kek_file or {CA_KEK_ENV}",
            path.display()
        );
    };
    let key = sealed::open(&text, kek).with_context(|| {
        format!(
            "decrypting {} with the configured key-encryption key",
            path.display()
        )
    })?;
    Ok((key, true))
}

/// Writes a CA private key, encrypted under the KEK when there is one.
pub(crate) fn write_ca_key(path: &Path, key: &SecretPem, kek: Option<&Kek>) -> anyhow::Result<()> {
    match kek {
        Some(kek) => {
            let text =
                sealed::seal(key, kek).with_context(|| format!("encrypting {}", path.display()))?;
            write_atomic(path, text.as_bytes(), 0o600)
        }
        None => write_secret(path, key),
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub(crate) fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

/// Writes a private key: mode 0600 from the first byte, then an atomic rename into place.
fn write_secret(path: &Path, secret: &SecretPem) -> anyhow::Result<()> {
    write_atomic(path, secret.expose().as_bytes(), 0o600)
}

pub(crate) fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write_atomic(path, text.as_bytes(), 0o644)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The connection string for a policy, in Azure form.
pub fn connection_string(host: &str, policy: &AuthorizationPolicy) -> String {
    format!(
        "HostName={host};SharedAccessKeyName={};SharedAccessKey={}",
        policy.key_name, policy.primary_key
    )
}

/// Parses `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (keys case-insensitive).
pub fn parse_connection_string(text: &str) -> Result<(String, String, String), String> {
    let mut host = None;
    let mut name = None;
    let mut key = None;
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("connection string part {part:?} is not key=value"))?;
        match k.to_ascii_lowercase().as_str() {
            "hostname" => host = Some(v.to_string()),
            "sharedaccesskeyname" => name = Some(v.to_string()),
            "sharedaccesskey" => key = Some(v.to_string()),
            _ => {}
        }
    }
    match (host, name, key) {
        (Some(h), Some(n), Some(k)) => Ok((h, n, k)),
        _ => Err(
            "a connection string needs HostName, SharedAccessKeyName and SharedAccessKey".into(),
        ),
    }
}

/// Stored JSON of a policy; tolerant of fields added later.
pub fn policy_from_doc(body: Value) -> Result<AuthorizationPolicy, serde_json::Error> {
    serde_json::from_value(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_scope_format() {
        let scope = new_id_scope();
        assert_eq!(scope.len(), 11);
        assert!(scope.starts_with("0ne"));
        assert!(scope[3..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn connection_strings_round_trip() {
        let policy = AuthorizationPolicy {
            key_name: "p".into(),
            primary_key: "a2V5".into(),
            secondary_key: "b".into(),
            rights: "EnrollmentRead".into(),
        };
        let cs = connection_string("localhost:8443", &policy);
        assert_eq!(
            parse_connection_string(&cs).unwrap(),
            ("localhost:8443".into(), "p".into(), "a2V5".into())
        );
        assert!(parse_connection_string("HostName=x").is_err());
    }

    #[test]
    fn replicas_starting_together_agree_on_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let roots: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| load_or_create_ca(&paths, "0ne00000001", None).unwrap()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().root_cert_pem().to_string())
                .collect()
        });
        assert!(roots.windows(2).all(|w| w[0] == w[1]), "one CA for all");
        assert_eq!(
            load_or_create_ca(&paths, "0ne00000001", None)
                .unwrap()
                .root_cert_pem(),
            roots[0]
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".ca-"))
            .collect();
        assert!(leftovers.is_empty(), "staging folders are cleaned up");
    }

    #[test]
    fn ca_keys_are_encrypted_under_the_kek() {
        let private = ["PRIVATE", "KEY"].join(" ");
        let kek = Kek::generate().unwrap();
        // First start with a KEK: both keys are written encrypted.
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let created = load_or_create_ca(&paths, "0ne00000001", Some(&kek)).unwrap();
        for path in [&paths.root_key, &paths.intermediate_key] {
            let text = fs::read_to_string(path).unwrap();
            assert!(
                sealed::is_sealed(&text) && !text.contains(&private),
                "{path:?}"
            );
            let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = load_or_create_ca(&paths, "0ne00000001", Some(&kek)).unwrap();
        assert_eq!(again.intermediate_key_pem(), created.intermediate_key_pem());

        // Without the KEK, or with another one: a clear error naming the file, no key.
        let err = format!(
            "{:#}",
            load_or_create_ca(&paths, "0ne00000001", None).unwrap_err()
        );
        assert!(err.contains("root.key is encrypted"), "{err}");
        assert!(
            err.contains("ca.kek_file") && err.contains(CA_KEK_ENV),
            "{err}"
        );
        let other = Kek::generate().unwrap();
        let err = format!(
            "{:#}",
            load_or_create_ca(&paths, "0ne00000001", Some(&other)).unwrap_err()
        );
        assert!(err.contains("root.key") && err.contains(&kek.id()), "{err}");
        assert!(
            !err.contains(&private) && !err.contains(&kek.to_base64()),
            "{err}"
        );

        // An offline root: the intermediate alone is enough.
        fs::remove_file(&paths.root_key).unwrap();
        let offline = load_or_create_ca(&paths, "0ne00000001", Some(&kek)).unwrap();
        assert!(offline.root_key_pem().is_none());
    }

    #[test]
    fn plaintext_ca_keys_are_migrated_when_a_kek_is_set() {
        let private = ["PRIVATE", "KEY"].join(" ");
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let created = load_or_create_ca(&paths, "0ne00000001", None).unwrap();
        assert!(
            fs::read_to_string(&paths.intermediate_key)
                .unwrap()
                .contains(&private)
        );
        let kek = Kek::generate().unwrap();
        let migrated = load_or_create_ca(&paths, "0ne00000001", Some(&kek)).unwrap();
        assert_eq!(
            migrated.intermediate_key_pem(),
            created.intermediate_key_pem()
        );
        for path in [&paths.root_key, &paths.intermediate_key] {
            let text = fs::read_to_string(path).unwrap();
            assert!(sealed::is_sealed(&text), "{path:?}");
            assert!(
                sealed::open(&text, &kek)
                    .unwrap()
                    .expose()
                    .contains(&private)
            );
        }
        assert!(load_or_create_ca(&paths, "0ne00000001", None).is_err());
    }

    #[test]
    fn secrets_are_written_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_secret(&path, &SecretPem::new("secret".into())).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "secret");
    }
}
