//! Connections: the backend chosen from the URL, the r2d2 manager, SQLite pragmas and the
//! embedded migrations.
//!
//! We build each connection from the URL scheme ourselves instead of using
//! `AnyConnection::establish` (through `r2d2::ConnectionManager`): that tries every backend in
//! turn, reports a useless "invalid connection url" when PostgreSQL is down, and would hand a
//! `postgres://` URL to SQLite as a file name.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ManageConnection, R2D2Connection as _};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection as _, RunQueryDsl as _};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};

use super::StoreError;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/postgres");

/// How long SQLite waits for another connection's lock before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const SQLITE_PRAGMAS: &str = "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;";

/// Key of the PostgreSQL advisory lock held while migrating ("zt-migr" in ASCII).
const MIGRATION_LOCK: i64 = 0x007a_742d_6d69_6772;

/// One pooled connection of either backend.
#[derive(diesel::MultiConnection)]
pub(crate) enum AnyConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

/// The database product behind a [`Database`](super::Database).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where to connect, parsed from the URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A file path, relative or absolute.
    Sqlite(String),
    /// The full libpq URL.
    Postgres(String),
}

// By hand: the PostgreSQL URL may contain a password.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Target::Postgres(_) => f.write_str("Postgres([redacted])"),
        }
    }
}

impl Target {
    pub(crate) fn parse(url: &str, connect_timeout: Duration) -> Result<Target, StoreError> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(StoreError::InvalidUrl(
                "expected sqlite://PATH or postgres://…".to_owned(),
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" if rest.is_empty() => Err(StoreError::InvalidUrl(
                "the SQLite path is empty".to_owned(),
            )),
            "sqlite" if rest == ":memory:" => Err(StoreError::InvalidUrl(
                "in-memory SQLite is not supported: every pooled connection would see its own \
                 database"
                    .to_owned(),
            )),
            "sqlite" => Ok(Target::Sqlite(rest.to_owned())),
            "postgres" | "postgresql" => {
                Ok(Target::Postgres(with_connect_timeout(url, connect_timeout)))
            }
            other if is_plain_scheme(other) => Err(StoreError::InvalidUrl(format!(
                "unsupported scheme `{other}` (expected sqlite or postgres)"
            ))),
            _ => Err(StoreError::InvalidUrl(
                "unsupported scheme (expected sqlite or postgres)".to_owned(),
            )),
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Target::Sqlite(_) => Backend::Sqlite,
            Target::Postgres(_) => Backend::Postgres,
        }
    }

    /// Creates the directory that will hold the SQLite file.
    pub(crate) fn prepare(&self) -> Result<(), StoreError> {
        if let Target::Sqlite(path) = self
            && let Some(dir) = Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        Ok(())
    }

    pub(crate) fn connect(&self) -> Result<AnyConnection, r2d2::Error> {
        match self {
            Target::Postgres(url) => PgConnection::establish(url)
                .map(AnyConnection::Postgresql)
                .map_err(r2d2::Error::ConnectionError),
            Target::Sqlite(path) => {
                let mut conn =
                    SqliteConnection::establish(path).map_err(r2d2::Error::ConnectionError)?;
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {};",
                    SQLITE_BUSY_TIMEOUT.as_millis()
                ))
                .and_then(|()| enable_wal(&mut conn))
                .and_then(|()| conn.batch_execute(SQLITE_PRAGMAS))
                .map_err(r2d2::Error::QueryError)?;
                Ok(AnyConnection::Sqlite(conn))
            }
        }
    }
}

#[derive(diesel::QueryableByName)]
struct JournalMode {
    #[diesel(sql_type = diesel::sql_types::Text)]
    journal_mode: String,
}

/// Switches the database file to write-ahead logging (a persistent setting).
///
/// SQLite answers "database is locked" at once, without waiting for busy_timeout, when several
/// connections switch a new file at the same moment (replicas or tests starting together), so
/// this retries for as long as busy_timeout would have waited.
fn enable_wal(conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
    use diesel::result::Error;
    let deadline = Instant::now() + SQLITE_BUSY_TIMEOUT;
    loop {
        let error = match diesel::sql_query("PRAGMA journal_mode = WAL").load::<JournalMode>(conn) {
            Ok(modes) => match modes.into_iter().next() {
                Some(mode) if mode.journal_mode.eq_ignore_ascii_case("wal") => return Ok(()),
                other => Error::QueryBuilderError(
                    format!(
                        "SQLite stays in journal mode {:?} instead of WAL",
                        other.map(|m| m.journal_mode)
                    )
                    .into(),
                ),
            },
            Err(error) => error,
        };
        let transient = match &error {
            Error::DatabaseError(_, info) => super::is_sqlite_busy(info.message()),
            Error::QueryBuilderError(_) => true,
            _ => false,
        };
        if !transient || Instant::now() >= deadline {
            return Err(error);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Only echo a scheme back when it cannot be part of a mangled URL with credentials.
fn is_plain_scheme(scheme: &str) -> bool {
    !scheme.is_empty()
        && scheme.len() <= 16
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Adds libpq's `connect_timeout` unless the URL sets one: without it a connect to an
/// unreachable host can hang for minutes.
fn with_connect_timeout(url: &str, timeout: Duration) -> String {
    if url.contains("connect_timeout=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!(
        "{url}{separator}connect_timeout={}",
        timeout.as_secs().max(1)
    )
}

/// Connections for r2d2, made by [`Target::connect`].
pub(crate) struct Manager {
    pub(crate) target: Target,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("target", &self.target)
            .finish()
    }
}

/// A connection returned to the pool this recently is handed out again without a ping. r2d2
/// tests every checkout with `SELECT 1`, which on PostgreSQL is a network round trip per store
/// call (17 of the 42 statements of a symmetric-key registration). Under load connections come
/// back within milliseconds and skip it; one idle longer (say, across a database restart) is
/// still tested. Like HikariCP's `aliveBypassWindowMs`.
pub(crate) const TRUSTED_FOR: Duration = Duration::from_millis(500);

/// A pooled connection and when it was last returned healthy.
pub(crate) struct Pooled {
    conn: AnyConnection,
    returned_at: Option<Instant>,
}

impl std::ops::Deref for Pooled {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

impl ManageConnection for Manager {
    type Connection = Pooled;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<Pooled, r2d2::Error> {
        Ok(Pooled {
            conn: self.target.connect()?,
            returned_at: None,
        })
    }

    fn is_valid(&self, conn: &mut Pooled) -> Result<(), r2d2::Error> {
        if conn
            .returned_at
            .is_some_and(|at| at.elapsed() < TRUSTED_FOR)
        {
            return Ok(());
        }
        conn.conn.ping().map_err(r2d2::Error::QueryError)
    }

    /// Called when a connection goes back to the pool.
    fn has_broken(&self, conn: &mut Pooled) -> bool {
        let broken = conn.conn.is_broken();
        conn.returned_at = (!broken).then(Instant::now);
        broken
    }
}

/// Applies the pending migrations of the connection's backend.
///
/// Concurrent openers (replicas starting together, parallel tests) are serialised: on
/// PostgreSQL by an advisory lock, on SQLite by running everything in one `BEGIN IMMEDIATE`
/// transaction. The loser then finds nothing left to do.
pub(crate) fn migrate(conn: &mut AnyConnection) -> Result<(), StoreError> {
    match conn {
        AnyConnection::Postgresql(pg) => {
            diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")).execute(pg)?;
            let applied = pg
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(drop)
                .map_err(migration_error);
            // The lock would also go with the connection, which the caller drops.
            let unlocked =
                diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
                    .execute(pg);
            applied?;
            unlocked?;
            Ok(())
        }
        AnyConnection::Sqlite(sqlite) => sqlite
            .immediate_transaction(|c| c.run_pending_migrations(SQLITE_MIGRATIONS).map(drop))
            .map_err(migration_error),
    }
}

fn migration_error(error: Box<dyn std::error::Error + Send + Sync>) -> StoreError {
    match error.downcast::<diesel::result::Error>() {
        Ok(diesel_error) => match StoreError::from(*diesel_error) {
            unavailable @ StoreError::Unavailable(_) => unavailable,
            other => StoreError::Backend(format!("migrations failed: {other}")),
        },
        Err(other) => StoreError::Backend(format!("migrations failed: {other}")),
    }
}

/// A connection or pool failure: the database cannot be reached (or is out of connections).
pub(crate) fn unavailable(error: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(7);

    #[test]
    fn parses_sqlite_urls() {
        assert_eq!(
            Target::parse("sqlite://data/zt.db", T).unwrap(),
            Target::Sqlite("data/zt.db".to_owned())
        );
        assert_eq!(
            Target::parse(" SQLite:///var/lib/zt.db ", T).unwrap(),
            Target::Sqlite("/var/lib/zt.db".to_owned())
        );
    }

    #[test]
    fn postgres_urls_get_a_connect_timeout() {
        for (url, expected) in [
            ("postgres://u@h/db", "postgres://u@h/db?connect_timeout=7"),
            (
                "postgresql://u@h/db?sslmode=require",
                "postgresql://u@h/db?sslmode=require&connect_timeout=7",
            ),
            (
                "postgres://u@h/db?connect_timeout=3",
                "postgres://u@h/db?connect_timeout=3",
            ),
        ] {
            assert_eq!(
                Target::parse(url, T).unwrap(),
                Target::Postgres(expected.to_owned())
            );
        }
    }

    #[test]
    fn rejects_unusable_urls_without_echoing_them() {
        for url in [
            "",
            "zt.db",
            "sqlite://",
            "sqlite://:memory:",
            "sqlite::memory:",
            "mysql://root:hunter2@db/zt",
            "user:hunter2@host://x",
        ] {
            match Target::parse(url, T) {
                Err(StoreError::InvalidUrl(message)) => {
                    assert!(!message.contains("hunter2"), "{message}")
                }
                other => panic!("{url:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn debug_hides_the_postgres_url() {
        let target = Target::parse("postgres://u:hunter2@h/db", T).unwrap();
        assert!(!format!("{target:?}").contains("hunter2"));
    }
}
