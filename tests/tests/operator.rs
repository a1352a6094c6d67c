//! What an operator meets running `zerotouch` (issue 12): one server per data dir and one hub
//! per PostgreSQL database, CLI verbs that never create an instance, the open file limit, and
//! errors that name the cause and the fix. Every test runs real `zerotouch` processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};
use serde_json::Value;
use zerotouch_tests::cluster::{Node, address, address_block, program, run_bounded};
use zerotouch_tests::{Backend, TempPostgres, backends};

/// How long a `serve` that must refuse to start may take to do so.
const REFUSAL: Duration = Duration::from_secs(30);

/// `[database]` for a node on `backend` (SQLite: none, the data dir's file).
fn database_config(pg: Option<&TempPostgres>) -> String {
    match pg {
        Some(pg) => format!("[database]\nurl = \"{}\"\n", pg.url),
        None => String::new(),
    }
}

fn temp_postgres(backend: Backend) -> Option<TempPostgres> {
    (backend == Backend::Postgres).then(|| TempPostgres::create().expect("PostgreSQL database"))
}

/// A config file for a second server at `ip` (its own listeners, `data_dir`), in `dir`.
fn write_config(dir: &Path, ip: &str, data_dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("zerotouch-{ip}.toml"));
    std::fs::write(
        &path,
        format!(
            "[listen]\nhttps = \"{ip}:18443\"\nmqtt = \"{ip}:8883\"\n\n[service]\nhostnames = \
             [\"{ip}\"]\ndata_dir = \"{}\"\n\n{extra}\n",
            data_dir.display()
        ),
    )
    .expect("config");
    path
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `zerotouch <args>` (no config unless `args` has one), run from `cwd`.
fn cli_in(cwd: &Path, args: &[impl AsRef<std::ffi::OsStr>], env: &[(&str, &str)]) -> Output {
    Command::new(program())
        .args(args)
        .current_dir(cwd)
        .env_remove("ZEROTOUCH_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run zerotouch")
}

// Item 5: one server per data dir, on either backend. The lock dies with its holder.
#[test]
fn a_second_server_on_a_data_dir_is_refused_with_the_holders_pid() {
    for backend in backends() {
        let pg = temp_postgres(backend);
        let db = database_config(pg.as_ref());
        let block = address_block();
        let mut first = Node::start(&address(block, 1), "all", &db, &[]);
        let pid = first.pid().expect("pid");

        // Another port, same data dir: refused, naming the holder's pid.
        let other = tempfile::tempdir().expect("tempdir");
        let config = write_config(other.path(), &address(block, 2), &first.data_dir(), &db);
        let refused = run_bounded(
            Command::new(program())
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn"),
            REFUSAL,
        );
        assert!(
            !refused.status.success(),
            "{backend:?}: a second server ran"
        );
        let message = stderr(&refused);
        assert!(
            message.contains(&format!("pid {pid}")) && message.contains("in use"),
            "{backend:?}: {message}"
        );
        assert!(message.contains("--data-dir"), "{backend:?}: {message}");

        // SIGKILL frees the data dir: a server on another address starts on it at once.
        first.kill();
        let data_dir = first.data_dir();
        let second = Node::start(
            &address(block, 3),
            "all",
            &db,
            &["--data-dir", &data_dir.display().to_string()],
        );
        let lock = std::fs::read_to_string(data_dir.join("serve.lock")).expect("lock file");
        assert_eq!(
            lock.trim(),
            second.pid().expect("pid").to_string(),
            "{backend:?}"
        );
        drop(second);
        drop(first);
    }
}

// Item 5, PostgreSQL: one hub per database; provisioning-only processes may join it.
#[test]
fn a_second_hub_on_one_postgres_database_is_refused() {
    if !backends().contains(&Backend::Postgres) {
        return;
    }
    let pg = TempPostgres::create().expect("PostgreSQL database");
    let db = database_config(Some(&pg));
    let block = address_block();
    let mut hub = Node::start(&address(block, 1), "all", &db, &[]);
    let pid = hub.pid().expect("pid");

    for role in ["all", "hub"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(
            dir.path(),
            &address(block, 2),
            &dir.path().join("data"),
            &db,
        );
        let refused = run_bounded(
            Command::new(program())
                .args(["serve", "--role", role, "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn"),
            REFUSAL,
        );
        assert!(!refused.status.success(), "a second hub ran ({role})");
        let message = stderr(&refused);
        assert!(
            message.contains("already runs the hub") && message.contains("not supported yet"),
            "{message}"
        );
        assert!(message.contains(&format!("pid {pid}")), "{message}");
        assert!(message.contains("--role dps"), "{message}");
    }

    // A provisioning-only process shares the database with the hub.
    let dps = Node::start(&address(block, 3), "dps", &db, &[]);
    assert!(dps.credentials()["idScope"].is_string());

    // The lock goes with its holder: after SIGKILL another process may run the hub.
    hub.kill();
    let next = Node::start(&address(block, 4), "all", &db, &[]);
    assert!(next.credentials()["hubConnectionString"].is_string());
}

/// Whether the PostgreSQL database at `url` has any table of ours.
fn has_tables(url: &str) -> bool {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(url).expect("connect");
    diesel::sql_query(
        "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .get_result::<Count>(&mut conn)
    .expect("count")
    .n > 0
}

/// Every file under `dir`, with its contents.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("zerotouch.db"))
            {
                out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

fn with_data_dir(verb: &[&str], dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = verb.iter().map(|a| a.to_string()).collect();
    args.push("--data-dir".into());
    args.push(dir.display().to_string());
    args
}

/// The CLI verbs that read the local data dir and database.
const LOCAL_VERBS: &[&[&str]] = &[
    &["credentials"],
    &["token", "create", "--rights", "EnrollmentRead"],
    &["token", "rotate-secret"],
    &["hub", "join-token"],
    &["ca", "rotate-intermediate"],
    &["ca", "retire-intermediate"],
    // Without --connection-string, the management clients sign with the local owner policy.
    &["enrollment", "list"],
    &["cert", "list"],
];

// Item 6: no command but `serve` creates a data dir, a database, a CA or a key.
#[test]
fn local_verbs_never_create_an_instance() {
    for backend in backends() {
        let pg = temp_postgres(backend);
        let db = database_config(pg.as_ref());
        let node = Node::start(&address(address_block(), 1), "all", &db, &[]);
        let scratch = tempfile::tempdir().expect("tempdir");
        let missing = scratch.path().join("missing");
        let empty = scratch.path().join("empty");
        std::fs::create_dir(&empty).expect("dir");
        let data_dir = node.data_dir();
        let before = snapshot(&data_dir);

        for verb in LOCAL_VERBS {
            // No data dir: refused, naming the path and `serve`; nothing created.
            let missing_arg = missing.display().to_string();
            let output = cli_in(scratch.path(), &with_data_dir(verb, &missing), &[]);
            let message = stderr(&output);
            assert!(!output.status.success(), "{verb:?} succeeded");
            assert!(
                message.contains(&missing_arg) && message.contains("zerotouch serve"),
                "{verb:?}: {message}"
            );
            assert!(!missing.exists(), "{verb:?} created {missing:?}");

            // A data dir without a database: refused, naming zerotouch.db and --config.
            let output = cli_in(scratch.path(), &with_data_dir(verb, &empty), &[]);
            let message = stderr(&output);
            assert!(!output.status.success(), "{verb:?} succeeded");
            assert!(
                message.contains(&empty.join("zerotouch.db").display().to_string())
                    && message.contains("--config"),
                "{verb:?}: {message}"
            );
            assert_eq!(
                std::fs::read_dir(&empty).expect("dir").count(),
                0,
                "{verb:?}"
            );
        }

        // The server's data dir without its --config (which names the database).
        let data_dir_arg = data_dir.display().to_string();
        let output = cli_in(
            scratch.path(),
            &["credentials", "--data-dir", &data_dir_arg],
            &[],
        );
        match backend {
            Backend::Postgres => {
                let message = stderr(&output);
                assert!(!output.status.success(), "credentials bootstrapped SQLite");
                assert!(
                    message.contains("zerotouch.db") && message.contains("--config"),
                    "{message}"
                );
                assert!(!data_dir.join("zerotouch.db").exists());

                // A PostgreSQL database without an instance: refused, left without tables.
                let empty_db = TempPostgres::create().expect("PostgreSQL database");
                let output = cli_in(
                    scratch.path(),
                    &["credentials", "--data-dir", &data_dir_arg],
                    &[("ZEROTOUCH__DATABASE__URL", &empty_db.url)],
                );
                let message = stderr(&output);
                assert!(!output.status.success(), "credentials on an empty database");
                assert!(message.contains("holds no Zerotouch instance"), "{message}");
                assert!(
                    !has_tables(&empty_db.url),
                    "the CLI migrated an empty database"
                );
            }
            Backend::Sqlite => {
                // Default settings (hostnames = localhost) read the instance but rewrite
                // nothing: the server certificate stays the one `serve` issued.
                assert!(output.status.success(), "{}", stderr(&output));
                let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON");
                assert_eq!(printed["idScope"], node.credentials()["idScope"]);
            }
        }
        // With the server's config every verb works, and none rewrote a file.
        assert!(node.credentials()["idScope"].is_string());
        node.cli(&["token", "create", "--rights", "EnrollmentRead"]);
        node.cli(&["hub", "join-token"]);
        assert_eq!(
            snapshot(&data_dir),
            before,
            "{backend:?}: the CLI rewrote files"
        );
    }
}

// Item 6: a joined hub's `credentials` print the bundle it serves with, whatever the role in
// its configuration (here `all`, overridden by `serve --role hub`).
#[test]
fn credentials_of_a_joined_hub_name_its_trust_bundle_whatever_the_configured_role() {
    let block = address_block();
    let dps = Node::start(&address(block, 1), "dps", "", &[]);
    let token = dps.cli(&["hub", "join-token", "--ttl", "5m"]);
    let hub = Node::start(
        &address(block, 2),
        "all",
        "",
        &[
            "--role",
            "hub",
            "--dps-url",
            &dps.url(""),
            "--join-token",
            token.trim(),
        ],
    );
    let credentials = hub.credentials();
    let bundle = PathBuf::from(credentials["caBundlePath"].as_str().expect("path"));
    assert_eq!(
        bundle,
        hub.data_dir()
            .join("join/trust.pem")
            .canonicalize()
            .expect("trust.pem")
    );
    // That bundle is what verifies the hub's HTTPS certificate.
    let client = zerotouch_tests::client_trusting(&bundle, None);
    let status = client
        .get(hub.url("/healthz"))
        .send()
        .expect("healthz")
        .status();
    assert_eq!(status, 200);
}

// Item 7: `serve` raises its soft open file limit to the hard limit, and says so.
#[test]
fn serve_raises_the_open_file_limit_to_the_hard_limit() {
    let node = Node::start_under(
        &["prlimit", "--nofile=1024:4096", "--"],
        &address(address_block(), 1),
        "all",
        "",
        &[],
        &[],
    );
    let ca = node.ca_bundle();
    let metrics = zerotouch_tests::client_trusting(&ca, None)
        .get(node.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l == "zerotouch_process_max_fds 4096"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("max_fds"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = node.log_text();
    assert!(
        log.contains("open file limit") && log.contains("limit=4096"),
        "{log}"
    );
}

// Item 15: a management call without --ca-file to a server whose CA the client does not trust
// says so once, with the fix, instead of OpenSSL's line twice.
#[test]
fn an_untrusted_server_certificate_names_ca_file_once() {
    let node = Node::start(&address(address_block(), 1), "all", "", &[]);
    let cs = node.credentials()["dpsConnectionString"]
        .as_str()
        .expect("cs")
        .to_string();
    let cwd = tempfile::tempdir().expect("tempdir");
    let output = cli_in(
        cwd.path(),
        &["enrollment", "list", "--connection-string", &cs],
        &[],
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(
        message.contains("not trusted") && message.contains("--ca-file"),
        "{message}"
    );
    assert!(
        message.matches("certificate verify failed").count() <= 1,
        "{message}"
    );
    assert!(
        !message.contains("error:0A"),
        "raw OpenSSL codes: {message}"
    );

    // With the fix it names, the same call works.
    let ok = cli_in(
        cwd.path(),
        &[
            "enrollment",
            "list",
            "--connection-string",
            &cs,
            "--ca-file",
            &node.ca_bundle().display().to_string(),
        ],
        &[],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
}

/// `uid` of this process (0 when root), from /proc.
fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .and_then(|uid| uid.parse().ok())
        .expect("Uid line")
}

// Item 15: binding a privileged port without the privilege fails before the data dir exists,
// naming an unprivileged port and CAP_NET_BIND_SERVICE.
#[test]
fn a_privileged_port_without_privileges_fails_with_the_fix_and_creates_nothing() {
    let first_unprivileged: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(1024);
    assert!(
        first_unprivileged > 443,
        "every port is unprivileged on this machine (net.ipv4.ip_unprivileged_port_start = \
         {first_unprivileged}): this test needs 443 to be privileged"
    );
    // A directory the unprivileged user may write into, so only the bind can stop it.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let ip = address(address_block(), 1);
    let data_dir = dir.path().join("data");
    let config = dir.path().join("zerotouch.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nhttps = \"{ip}:443\"\nmqtt = \"{ip}:8883\"\n\n[service]\nhostnames = \
             [\"{ip}\"]\ndata_dir = \"{}\"\n",
            data_dir.display()
        ),
    )
    .expect("config");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    // As root (CI), drop to nobody without capabilities; otherwise run as this user.
    let mut command = if current_uid() == 0 {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(program());
        c
    } else {
        Command::new(program())
    };
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn");
    let output = run_bounded(&mut command, REFUSAL);
    assert!(
        !output.status.success(),
        "serve bound 443 without privileges"
    );
    let message = stderr(&output);
    assert!(
        message.contains(":443") && message.contains("CAP_NET_BIND_SERVICE"),
        "{message}"
    );
    assert!(message.contains("8443"), "{message}");
    assert!(
        !data_dir.exists(),
        "the data dir was created before failing"
    );
}

// Item 15: `hub drain` / `hub remove` of the built-in hub are refused with a stable code and
// the reason; `hub activate` shows it (always active).
#[test]
fn the_built_in_hub_cannot_be_drained_or_removed() {
    let node = Node::start(&address(address_block(), 1), "all", "", &[]);
    let list: Value = serde_json::from_str(&node.cli(&["hub", "list"])).expect("JSON");
    let built_in = &list["value"][0];
    assert_eq!(built_in["builtIn"], true, "{list}");
    let name = built_in["name"].as_str().expect("name");
    for (verb, action) in [("drain", "drained"), ("remove", "removed")] {
        let output = node.cli_output(&["hub", verb, name]);
        assert!(!output.status.success(), "hub {verb} of the built-in hub");
        let message = stderr(&output);
        assert!(message.contains("409206"), "{message}");
        assert!(
            message.contains("built-in hub") && message.contains(&format!("cannot be {action}")),
            "{message}"
        );
        assert!(message.contains("--role hub"), "{message}");
    }
    let shown: Value = serde_json::from_str(&node.cli(&["hub", "activate", name])).expect("JSON");
    assert_eq!(shown["state"], "active");
    assert_eq!(shown["builtIn"], true);
    // Still listed, still active.
    let list: Value = serde_json::from_str(&node.cli(&["hub", "list"])).expect("JSON");
    assert_eq!(list["value"][0]["state"], "active");
}

// Item 15: `ca upload` of an existing name says how to replace it with the CLI (--etag).
#[test]
fn ca_upload_of_an_existing_name_points_at_etag() {
    let node = Node::start(&address(address_block(), 1), "all", "", &[]);
    let files = tempfile::tempdir().expect("tempdir");
    let first = files.path().join("first.pem");
    let second = files.path().join("second.pem");
    std::fs::write(
        &first,
        zerotouch_tests::pki::TestCa::new("first CA").cert_pem,
    )
    .expect("pem");
    std::fs::write(
        &second,
        zerotouch_tests::pki::TestCa::new("second CA").cert_pem,
    )
    .expect("pem");
    let upload = |file: &Path, extra: &[&str]| {
        let mut args = vec!["ca", "upload", "line-ca", "--certificate"];
        let file = file.display().to_string();
        args.push(&file);
        args.extend_from_slice(extra);
        node.cli_output(&args)
    };
    let created = upload(&first, &[]);
    assert!(created.status.success(), "{}", stderr(&created));

    let refused = upload(&second, &[]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("already exists") && message.contains("--etag"),
        "{message}"
    );
    assert!(!message.contains("If-Match"), "{message}");

    // A stale etag is refused (412), `*` replaces.
    let stale = upload(&second, &["--etag", "\"not-the-etag\""]);
    assert!(!stale.status.success());
    assert!(stderr(&stale).contains("412001"), "{}", stderr(&stale));
    let replaced = upload(&second, &["--etag", "*"]);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    let shown: Value = serde_json::from_str(&node.cli(&["ca", "show", "line-ca"])).expect("JSON");
    assert!(
        shown["properties"]["subject"]
            .as_str()
            .is_some_and(|s| s.contains("second CA")),
        "{shown}"
    );
    // And with the etag `ca show` prints.
    let etag = shown["etag"].as_str().expect("etag").to_string();
    let again = upload(&first, &["--etag", &etag]);
    assert!(again.status.success(), "{}", stderr(&again));
}

// Issue 17: `--output table` for people; JSON stays the default when stdout is not a terminal.
#[test]
fn list_and_show_verbs_print_tables_on_request_and_json_to_pipes() {
    let node = Node::start(&address(address_block(), 1), "all", "", &[]);
    node.cli(&["enrollment", "create", "table-dev-1"]);
    node.cli(&["group", "create", "table-fleet"]);

    let piped = node.cli(&["enrollment", "list"]);
    let parsed: serde_json::Value = serde_json::from_str(&piped).expect("JSON when piped");
    assert_eq!(parsed[0]["registrationId"], "table-dev-1", "{parsed}");

    let table = node.cli(&["enrollment", "list", "--output", "table"]);
    for expected in [
        "ID",
        "ATTESTATION",
        "STATUS",
        "table-dev-1",
        "symmetricKey",
        "1 item(s)",
    ] {
        assert!(table.contains(expected), "{expected} missing:\n{table}");
    }
    let groups = node.cli(&["group", "list", "--output", "table"]);
    assert!(groups.contains("table-fleet"), "{groups}");

    let shown = node.cli(&["enrollment", "show", "table-dev-1", "--output", "table"]);
    assert!(
        shown.contains("attestation.type") && shown.contains("symmetricKey"),
        "{shown}"
    );
    // Keys stay hidden in tables too, unless asked for.
    assert!(!shown.contains("primaryKey"), "{shown}");

    let policies = node.cli(&["policy", "list", "--output", "table"]);
    assert!(policies.contains("provisioningserviceowner"), "{policies}");
    assert!(
        !policies.contains("primaryKey"),
        "no keys in the table: {policies}"
    );
    let json = node.cli(&["enrollment", "list", "--output", "json"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&json).is_ok(),
        "{json}"
    );
}
