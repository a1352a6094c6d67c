//! What a process holds or checks on a database outside the pool.
//!
//! - [`HubLock`]: one hub per PostgreSQL database. A process that runs the hub holds a
//!   session-level advisory lock on a connection of its own for as long as it runs; a second
//!   hub on the same database is refused (the telemetry log has one writer, and live MQTT
//!   connections, connection state and pending method calls are per process). The lock ends
//!   with the connection, so with the process however it ends. Provisioning-only processes
//!   (`--role dps`) take no lock and may run beside the hub.
//! - [`has_setting`]: whether a database holds a setting, checked without applying migrations,
//!   so that the CLI's local verbs never turn an empty database into a new instance.

use std::sync::Mutex;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection as _, QueryableByName, RunQueryDsl as _};

use super::StoreError;
use super::connection::Target;

/// Key of the PostgreSQL advisory lock held by the process that runs the hub ("zt-hub" in ASCII).
const HUB_LOCK: i64 = 0x0000_7a74_2d68_7562;

/// The hub lock of a PostgreSQL database, held until dropped.
pub struct HubLock {
    // A connection is Send, not Sync; the mutex lets the lock sit in shared state.
    conn: Mutex<PgConnection>,
}

impl Drop for HubLock {
    /// Unlocks explicitly before the connection closes: a child process forked by another
    /// thread (between its fork and its exec) may hold a copy of the socket for a moment, which
    /// would keep the session, and the lock, alive after our close.
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = diesel::sql_query(format!("SELECT pg_advisory_unlock({HUB_LOCK})")).execute(conn);
    }
}

impl std::fmt::Debug for HubLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubLock")
    }
}

/// Why the hub lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum HubLockError {
    /// Another session holds it; `holder` describes that process when PostgreSQL tells.
    #[error(
        "another process already runs the hub on this PostgreSQL database{}: several hubs on one \
         database are not supported yet (hub replicas will be). Stop that process, or start this \
         one with --role dps (provisioning only), which may run beside the hub",
        holder.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    Held { holder: Option<String> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

#[derive(QueryableByName)]
struct Holder {
    #[diesel(sql_type = Nullable<Text>)]
    application_name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    client_addr: Option<String>,
}

impl HubLock {
    /// Takes the hub lock of the database at `url`. SQLite needs none (`Ok(None)`): its
    /// database lives in the data dir, which `serve` locks (see `crate::lock`).
    pub fn acquire(url: &str, timeout: Duration) -> Result<Option<HubLock>, HubLockError> {
        let Target::Postgres(url) = Target::parse(url, timeout)? else {
            return Ok(None);
        };
        let mut conn = PgConnection::establish(&url)
            .map_err(|e| StoreError::Unavailable(format!("connecting for the hub lock: {e}")))?;
        // What a refused second hub reads in pg_stat_activity.
        conn.batch_execute(&format!(
            "SET application_name = 'zerotouch hub, pid {}'",
            std::process::id()
        ))
        .map_err(StoreError::from)?;
        let locked =
            diesel::sql_query(format!("SELECT pg_try_advisory_lock({HUB_LOCK}) AS locked"))
                .get_result::<Locked>(&mut conn)
                .map_err(StoreError::from)?
                .locked;
        if !locked {
            return Err(HubLockError::Held {
                holder: holder(&mut conn),
            });
        }
        Ok(Some(HubLock {
            conn: Mutex::new(conn),
        }))
    }
}

/// "zerotouch hub, pid N, from ADDR" of the session holding the hub lock, if visible.
fn holder(conn: &mut PgConnection) -> Option<String> {
    let high = HUB_LOCK >> 32;
    let low = HUB_LOCK & 0xffff_ffff;
    let row = diesel::sql_query(format!(
        "SELECT a.application_name, host(a.client_addr) AS client_addr \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.classid::bigint = {high} AND l.objid::bigint = {low} \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         LIMIT 1"
    ))
    .get_result::<Holder>(conn)
    .ok()?;
    let mut text = row.application_name.filter(|n| !n.is_empty())?;
    if let Some(addr) = row.client_addr {
        text.push_str(&format!(", from {addr}"));
    }
    Some(text)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Whether the database at `url` exists and holds the setting `key`, without creating or
/// migrating anything: a missing SQLite file or a PostgreSQL database without our tables is
/// `Ok(false)`.
pub fn has_setting(url: &str, key: &str, timeout: Duration) -> Result<bool, StoreError> {
    match Target::parse(url, timeout)? {
        Target::Sqlite(path) => {
            if !std::path::Path::new(&path).is_file() {
                return Ok(false);
            }
            // The file exists: opening it creates nothing (SQLite's own -wal/-shm aside).
            let mut conn = SqliteConnection::establish(&path)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let tables = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'settings'",
            )
            .get_result::<Count>(&mut conn)?
            .n;
            if tables == 0 {
                return Ok(false);
            }
            let n = diesel::sql_query("SELECT COUNT(*) AS n FROM settings WHERE key = ?")
                .bind::<Text, _>(key)
                .get_result::<Count>(&mut conn)?
                .n;
            Ok(n > 0)
        }
        Target::Postgres(url) => {
            let mut conn = PgConnection::establish(&url)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let tables = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = 'settings'",
            )
            .get_result::<Count>(&mut conn)?
            .n;
            if tables == 0 {
                return Ok(false);
            }
            let n = diesel::sql_query("SELECT COUNT(*) AS n FROM settings WHERE key = $1")
                .bind::<Text, _>(key)
                .get_result::<Count>(&mut conn)?
                .n;
            Ok(n > 0)
        }
    }
}
