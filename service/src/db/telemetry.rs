//! SQL of the durable telemetry store, for both backends. The engine that batches, acknowledges
//! and retains is `crate::telemetry`; this module only knows rows and statements.
//!
//! - [`Writer`] owns the one connection that appends. On SQLite it commits with
//!   `synchronous = FULL` (in WAL mode: every commit is fsynced before it returns); on
//!   PostgreSQL it makes sure `synchronous_commit` is not `off`.
//! - [`Reader`] is a small pool for reads and for retention passes started from outside the
//!   writer.
//!
//! Every value is bound; nothing is formatted into SQL.

use std::fmt;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::r2d2::{Pool, PooledConnection, R2D2Connection as _};
use diesel::sql_types::{BigInt, Text};

use super::StoreError;
use super::connection::{self, AnyConnection, Backend, Manager, Target};

/// A fresh SQLite file or PostgreSQL database per test, dropped afterwards (`db/tests.rs`).
#[cfg(test)]
pub(crate) use super::tests::Empty as TestDatabase;

/// Also the PostgreSQL connect timeout.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Read connections; appends never use them.
const READ_POOL_SIZE: u32 = 4;
/// Rows deleted per statement by retention, so that no pass holds SQLite's write lock for long.
const DELETE_CHUNK: i64 = 1000;

diesel::table! {
    /// See `migrations/*/2026-11-29-000003_telemetry/up.sql`.
    telemetry (msg_offset) {
        msg_offset -> BigInt,
        device_id -> Text,
        module_id -> Nullable<Text>,
        enqueued_at -> BigInt,
        size -> BigInt,
        system -> Text,
        properties -> Text,
        body -> Binary,
    }
}

/// Binds `$conn` to the concrete connection inside an `AnyConnection`.
macro_rules! with_backend {
    ($any:expr, $conn:ident => $body:expr) => {
        match $any {
            AnyConnection::Postgresql($conn) => $body,
            AnyConnection::Sqlite($conn) => $body,
        }
    };
}

/// A message ready to insert; the JSON columns are already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewRow {
    pub(crate) device_id: String,
    pub(crate) module_id: Option<String>,
    pub(crate) size: i64,
    /// JSON object.
    pub(crate) system: String,
    /// JSON array of `[name, value-or-null]`.
    pub(crate) properties: String,
    pub(crate) body: Vec<u8>,
}

#[derive(Insertable)]
#[diesel(table_name = telemetry)]
struct Insert<'a> {
    device_id: &'a str,
    module_id: Option<&'a str>,
    enqueued_at: i64,
    size: i64,
    system: &'a str,
    properties: &'a str,
    body: &'a [u8],
}

/// `INSERT … RETURNING msg_offset` of one [`NewRow`].
macro_rules! insert_row {
    ($conn:expr, $row:expr, $enqueued_at:expr) => {
        diesel::insert_into(telemetry::table)
            .values(Insert {
                device_id: &$row.device_id,
                module_id: $row.module_id.as_deref(),
                enqueued_at: $enqueued_at,
                size: $row.size,
                system: &$row.system,
                properties: &$row.properties,
                body: &$row.body,
            })
            .returning(telemetry::msg_offset)
            .get_result::<i64>($conn)
    };
}

/// A stored message as read back.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub(crate) struct Row {
    pub(crate) offset: i64,
    pub(crate) device_id: String,
    pub(crate) module_id: Option<String>,
    pub(crate) enqueued_at: i64,
    pub(crate) size: i64,
    pub(crate) system: String,
    pub(crate) properties: String,
    pub(crate) body: Vec<u8>,
}

/// The columns that make a [`Row`].
macro_rules! row_columns {
    () => {
        (
            telemetry::msg_offset,
            telemetry::device_id,
            telemetry::module_id,
            telemetry::enqueued_at,
            telemetry::size,
            telemetry::system,
            telemetry::properties,
            telemetry::body,
        )
    };
}

/// What the table holds at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Tail {
    /// The newest offset, 0 when the table is empty.
    pub(crate) last_offset: i64,
    /// The newest enqueue time (unix µs), 0 when the table is empty.
    pub(crate) last_enqueued_at: i64,
}

/// The connection that appends. Reconnects on the next call after a connection failure.
pub(crate) struct Writer {
    target: Target,
    conn: Option<AnyConnection>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("target", &self.target)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl Writer {
    /// Connects, applies pending migrations (idempotent and serialised, like
    /// [`open`](super::open)) and makes the connection durable.
    pub(crate) fn open(url: &str) -> Result<Writer, StoreError> {
        let target = Target::parse(url, CONNECTION_TIMEOUT)?;
        target.prepare()?;
        let mut conn = target.connect().map_err(connection::unavailable)?;
        connection::migrate(&mut conn)?;
        make_durable(&mut conn)?;
        Ok(Writer {
            target,
            conn: Some(conn),
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        self.target.backend()
    }

    /// A pool of read connections to the same database.
    pub(crate) fn reader(&self) -> Reader {
        let pool = Pool::builder()
            .max_size(READ_POOL_SIZE)
            .min_idle(Some(0))
            .connection_timeout(CONNECTION_TIMEOUT)
            .build_unchecked(Manager {
                target: self.target.clone(),
            });
        Reader { pool }
    }

    fn connection(&mut self) -> Result<&mut AnyConnection, StoreError> {
        if self.conn.is_none() {
            let mut conn = self.target.connect().map_err(connection::unavailable)?;
            make_durable(&mut conn)?;
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("telemetry writer not connected".to_owned()))
    }

    /// Drops the connection after a failure that may have broken it.
    fn settle<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &result {
            let broken = self.conn.as_mut().is_none_or(|c| c.is_broken());
            if broken || matches!(error, StoreError::Unavailable(_)) {
                self.conn = None;
            }
        }
        result
    }

    pub(crate) fn tail(&mut self) -> Result<Tail, StoreError> {
        let result = self.connection().and_then(tail);
        self.settle(result)
    }

    /// Inserts `rows` in one transaction, all stamped `enqueued_at`, and returns their offsets
    /// in the same order. Nothing is stored if it fails.
    ///
    /// Each caller must get its own message's offset, and neither database promises that a
    /// multi-row `INSERT … RETURNING` lists rows in `VALUES` order. So:
    /// - SQLite (in-process, a statement costs microseconds): one `INSERT … RETURNING` per row,
    ///   prepared once and cached by diesel.
    /// - PostgreSQL (a statement costs a network round trip): one statement takes the batch's
    ///   offsets from the identity sequence and inserts all rows with them (see
    ///   [`append_postgres`]); a `BEGIN` and a `COMMIT` would be two more round trips.
    pub(crate) fn append(
        &mut self,
        rows: &[&NewRow],
        enqueued_at: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let result = self.connection().and_then(|conn| {
            let offsets = match conn {
                // IMMEDIATE: take the write lock up front (waiting up to busy_timeout).
                AnyConnection::Sqlite(c) => c.immediate_transaction(|c| {
                    rows.iter()
                        .map(|row| insert_row!(c, row, enqueued_at))
                        .collect::<QueryResult<Vec<i64>>>()
                })?,
                // One statement: atomic without an explicit transaction.
                AnyConnection::Postgresql(c) => append_postgres(c, rows, enqueued_at)?,
            };
            Ok(offsets)
        });
        self.settle(result)
    }

    /// [`delete_older_than`] then [`delete_to_size`] on the writer's connection.
    pub(crate) fn enforce_retention(
        &mut self,
        cutoff_micros: i64,
        max_bytes: i64,
    ) -> Result<u64, StoreError> {
        let result = self
            .connection()
            .and_then(|conn| enforce_retention(conn, cutoff_micros, max_bytes));
        self.settle(result)
    }

    /// `PRAGMA synchronous` of the writer's SQLite connection (2 = FULL), for tests.
    #[cfg(test)]
    pub(crate) fn sqlite_pragmas(&mut self) -> Result<Option<(i64, String)>, StoreError> {
        #[derive(QueryableByName)]
        struct Synchronous {
            #[diesel(sql_type = BigInt)]
            synchronous: i64,
        }
        #[derive(QueryableByName)]
        struct JournalMode {
            #[diesel(sql_type = Text)]
            journal_mode: String,
        }
        match self.connection()? {
            AnyConnection::Sqlite(c) => {
                let sync = diesel::sql_query("PRAGMA synchronous").get_result::<Synchronous>(c)?;
                let mode = diesel::sql_query("PRAGMA journal_mode").get_result::<JournalMode>(c)?;
                Ok(Some((sync.synchronous, mode.journal_mode)))
            }
            AnyConnection::Postgresql(_) => Ok(None),
        }
    }
}

/// The PostgreSQL batch insert: one statement, hence one round trip and its own transaction
/// (autocommit), whatever the batch size.
///
/// `nextval` of the identity sequence gives `rows.len()` fresh offsets (`taken`, materialized
/// so that each is drawn once). They increase because only this writer takes them (an
/// interleaving replica would break more than this; see the module docs of
/// `crate::telemetry`). Ranked, the n-th smallest goes to the n-th row of the arrays (`WITH
/// ORDINALITY`), so the offsets follow the batch order whatever order PostgreSQL evaluates
/// rows in; the rows go in with them (`OVERRIDING SYSTEM VALUE`, the column being `GENERATED
/// ALWAYS`). `RETURNING` lists the offsets in no promised order: sorted, they are the rows'
/// in batch order. Every value is bound; the SQL text is constant.
fn append_postgres(
    conn: &mut diesel::pg::PgConnection,
    rows: &[&NewRow],
    enqueued_at: i64,
) -> QueryResult<Vec<i64>> {
    use diesel::sql_types::{Array, Binary, Nullable};

    #[derive(QueryableByName)]
    struct Offset {
        #[diesel(sql_type = BigInt)]
        msg_offset: i64,
    }
    let mut offsets: Vec<i64> = diesel::sql_query(
        "WITH taken AS MATERIALIZED ( \
             SELECT nextval(pg_get_serial_sequence('telemetry', 'msg_offset')) AS o \
             FROM generate_series(1, cardinality($2::text[]))), \
         ranked AS (SELECT o, row_number() OVER (ORDER BY o) AS n FROM taken) \
         INSERT INTO telemetry \
         (msg_offset, device_id, module_id, enqueued_at, size, system, properties, body) \
         OVERRIDING SYSTEM VALUE \
         SELECT r.o, t.d, t.m, $1, t.s, t.y, t.p, t.b \
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], \
                     $7::bytea[]) WITH ORDINALITY AS t(d, m, s, y, p, b, n) \
         JOIN ranked r ON r.n = t.n \
         RETURNING msg_offset",
    )
    .bind::<BigInt, _>(enqueued_at)
    .bind::<Array<Text>, _>(
        rows.iter()
            .map(|r| r.device_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Nullable<Text>>, _>(
        rows.iter()
            .map(|r| r.module_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.size).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(rows.iter().map(|r| r.system.as_str()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(
        rows.iter()
            .map(|r| r.properties.as_str())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Binary>, _>(rows.iter().map(|r| r.body.as_slice()).collect::<Vec<_>>())
    .load::<Offset>(conn)?
    .into_iter()
    .map(|o| o.msg_offset)
    .collect();
    offsets.sort_unstable();
    if offsets.len() != rows.len() {
        return Err(diesel::result::Error::QueryBuilderError(
            format!(
                "inserted {} rows for {} messages",
                offsets.len(),
                rows.len()
            )
            .into(),
        ));
    }
    Ok(offsets)
}

/// SQLite: `synchronous = FULL`, so that a commit is on disk when it returns (WAL and
/// busy_timeout are already set by [`Target::connect`]). PostgreSQL: commits wait for the WAL
/// flush unless `synchronous_commit` is `off`, which we undo for this session only. Any other
/// setting (`local`, `remote_write`, `on`, `remote_apply`) is durable locally and kept.
fn make_durable(conn: &mut AnyConnection) -> Result<(), StoreError> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        synchronous_commit: String,
    }
    match conn {
        AnyConnection::Sqlite(c) => c.batch_execute("PRAGMA synchronous = FULL;")?,
        AnyConnection::Postgresql(c) => {
            let setting = diesel::sql_query("SHOW synchronous_commit").get_result::<Setting>(c)?;
            if setting.synchronous_commit.eq_ignore_ascii_case("off") {
                c.batch_execute("SET synchronous_commit = on;")?;
            }
        }
    }
    Ok(())
}

fn tail(conn: &mut AnyConnection) -> Result<Tail, StoreError> {
    use diesel::dsl::max;
    let (last_offset, last_enqueued_at) = with_backend!(conn, c => {
        telemetry::table
            .select((max(telemetry::msg_offset), max(telemetry::enqueued_at)))
            .first::<(Option<i64>, Option<i64>)>(c)
    })?;
    Ok(Tail {
        last_offset: last_offset.unwrap_or(0),
        last_enqueued_at: last_enqueued_at.unwrap_or(0),
    })
}

/// Read connections.
pub(crate) struct Reader {
    pool: Pool<Manager>,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl Reader {
    fn connection(&self) -> Result<PooledConnection<Manager>, StoreError> {
        self.pool.get().map_err(connection::unavailable)
    }

    /// Rows with offset `>= from`, ascending, at most `limit`, optionally of one device.
    pub(crate) fn read(
        &self,
        from: i64,
        limit: i64,
        device_id: Option<&str>,
    ) -> Result<Vec<Row>, StoreError> {
        let mut conn = self.connection()?;
        let rows = with_backend!(&mut **conn, c => {
            let mut query = telemetry::table
                .select(row_columns!())
                .filter(telemetry::msg_offset.ge(from))
                .order(telemetry::msg_offset.asc())
                .limit(limit)
                .into_boxed();
            if let Some(device_id) = device_id {
                query = query.filter(telemetry::device_id.eq(device_id));
            }
            query.load::<Row>(c)
        })?;
        Ok(rows)
    }

    /// [`delete_older_than`] then [`delete_to_size`] on a pooled connection.
    pub(crate) fn enforce_retention(
        &self,
        cutoff_micros: i64,
        max_bytes: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = self.connection()?;
        enforce_retention(&mut conn, cutoff_micros, max_bytes)
    }
}

fn enforce_retention(
    conn: &mut AnyConnection,
    cutoff_micros: i64,
    max_bytes: i64,
) -> Result<u64, StoreError> {
    let by_age = delete_older_than(conn, cutoff_micros)?;
    let by_size = delete_to_size(conn, max_bytes)?;
    Ok(by_age.saturating_add(by_size))
}

/// Deletes messages enqueued before `cutoff_micros`, [`DELETE_CHUNK`] rows per statement.
pub(crate) fn delete_older_than(
    conn: &mut AnyConnection,
    cutoff_micros: i64,
) -> Result<u64, StoreError> {
    let mut deleted: u64 = 0;
    loop {
        // Two statements rather than `IN (SELECT … LIMIT)`, which diesel's DSL cannot express
        // for a DELETE. Not atomic, and need not be: stored rows never change.
        let oldest = with_backend!(&mut *conn, c => {
            telemetry::table
                .select(telemetry::msg_offset)
                .filter(telemetry::enqueued_at.lt(cutoff_micros))
                .order(telemetry::enqueued_at.asc())
                .limit(DELETE_CHUNK)
                .load::<i64>(c)
        })?;
        if oldest.is_empty() {
            return Ok(deleted);
        }
        let n = with_backend!(&mut *conn, c => {
            diesel::delete(telemetry::table.filter(telemetry::msg_offset.eq_any(&oldest)))
                .execute(c)
        })?;
        deleted = deleted.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        if i64::try_from(oldest.len()).unwrap_or(i64::MAX) < DELETE_CHUNK {
            return Ok(deleted);
        }
    }
}

/// Deletes the oldest messages until the stored sizes add up to at most `max_bytes`.
pub(crate) fn delete_to_size(conn: &mut AnyConnection, max_bytes: i64) -> Result<u64, StoreError> {
    #[derive(QueryableByName)]
    struct Total {
        #[diesel(sql_type = BigInt)]
        total: i64,
    }
    // SUM(bigint) is NUMERIC on PostgreSQL; the cast keeps one type for both backends. The
    // index on (enqueued_at, size) lets both databases answer this without reading bodies.
    let total = with_backend!(&mut *conn, c => {
        diesel::sql_query("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS total FROM telemetry")
            .get_result::<Total>(c)
    })?
    .total;
    let mut excess = total.saturating_sub(max_bytes.max(0));
    let mut deleted: u64 = 0;
    while excess > 0 {
        let oldest = with_backend!(&mut *conn, c => {
            telemetry::table
                .select((telemetry::msg_offset, telemetry::size))
                .order(telemetry::msg_offset.asc())
                .limit(DELETE_CHUNK)
                .load::<(i64, i64)>(c)
        })?;
        let Some(&(first, _)) = oldest.first() else {
            break;
        };
        let mut cutoff = first;
        for &(offset, size) in &oldest {
            cutoff = offset;
            excess = excess.saturating_sub(size.max(0));
            if excess <= 0 {
                break;
            }
        }
        let n = with_backend!(&mut *conn, c => {
            diesel::delete(telemetry::table.filter(telemetry::msg_offset.le(cutoff))).execute(c)
        })?;
        deleted = deleted.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok(deleted)
}
