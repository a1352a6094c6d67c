//! [`Database`]: the diesel implementation of [`DocumentStore`].
//!
//! Queries are written once and compiled for each (collection table, backend) pair by two
//! macros, `with_table!` and `with_backend!`. We query the concrete `PgConnection` /
//! `SqliteConnection` rather than the derived `AnyConnection` because diesel's `MultiBackend`
//! has no `ON CONFLICT` clause, which upserts and `setting_init` need.

use std::fmt;

use diesel::prelude::*;
use diesel::r2d2::{Pool, PooledConnection, R2D2Connection as _};
use diesel::sql_types;

use super::connection::{self, AnyConnection, Backend, Manager, Target};
use super::health::{Check, WriteHealth};
use super::schema::settings;
use super::{
    Collection, Document, DocumentStore, Options, Page, StoreError, UPDATE_ATTEMPTS, Write,
    continuation, etag,
};

const SQLITE_POOL_SIZE: u32 = 4;
const POSTGRES_POOL_SIZE: u32 = 8;
const MAX_PAGE_SIZE: usize = 1000;

/// Binds `$t` to the schema module of the table that holds collection `$c`.
macro_rules! with_table {
    ($c:expr, $t:ident => $body:expr) => {
        match $c {
            Collection::IndividualEnrollments => {
                use $crate::db::schema::individual_enrollments as $t;
                $body
            }
            Collection::EnrollmentGroups => {
                use $crate::db::schema::enrollment_groups as $t;
                $body
            }
            Collection::Registrations => {
                use $crate::db::schema::registrations as $t;
                $body
            }
            Collection::CaCertificates => {
                use $crate::db::schema::ca_certificates as $t;
                $body
            }
            Collection::AuthorizationPolicies => {
                use $crate::db::schema::authorization_policies as $t;
                $body
            }
            Collection::Devices => {
                use $crate::db::schema::devices as $t;
                $body
            }
            Collection::Twins => {
                use $crate::db::schema::twins as $t;
                $body
            }
            Collection::MqttSessions => {
                use $crate::db::schema::mqtt_sessions as $t;
                $body
            }
            Collection::C2dMessages => {
                use $crate::db::schema::c2d_messages as $t;
                $body
            }
            Collection::HubPolicies => {
                use $crate::db::schema::hub_policies as $t;
                $body
            }
            Collection::LinkedHubs => {
                use $crate::db::schema::linked_hubs as $t;
                $body
            }
            Collection::JoinTokens => {
                use $crate::db::schema::join_tokens as $t;
                $body
            }
            Collection::IssuedCertificates => {
                use $crate::db::schema::issued_certificates as $t;
                $body
            }
            Collection::AuditEvents => {
                use $crate::db::schema::audit_events as $t;
                $body
            }
            Collection::PkiState => {
                use $crate::db::schema::pki_state as $t;
                $body
            }
            Collection::StaleIdentities => {
                use $crate::db::schema::stale_identities as $t;
                $body
            }
            Collection::C2dFeedback => {
                use $crate::db::schema::c2d_feedback as $t;
                $body
            }
        }
    };
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

/// How a document write runs on each backend.
trait WriteStatement: Connection {
    /// Runs `write` (one statement, plus a read-only check on its failure path) so that a
    /// failed commit is reported.
    fn write_statement<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T>;

    /// Runs several reads and writes as one transaction that writes from its start.
    fn write_transaction<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T>;

    /// [`DocumentStore::update_batch`] in a few statements whatever the batch size, inside
    /// its transaction, where that pays: `None` when the statement-per-document path is to
    /// be taken (nothing was written then).
    fn update_batch_at_once(
        &mut self,
        _batch: &mut Batch<'_>,
    ) -> QueryResult<Option<Vec<Outcome>>> {
        Ok(None)
    }
}

/// One document's outcome in a batch, under its index in the batch.
type Outcome = (usize, Result<Option<Document>, StoreError>);

/// A [`DocumentStore::update_batch`] call, for [`WriteStatement::update_batch_at_once`].
struct Batch<'a> {
    collection: Collection,
    ids: &'a [&'a str],
    /// `(index into ids, id key)`, by key and, for one key, in arrival order.
    order: &'a [(usize, String)],
    change: &'a mut dyn FnMut(usize, Option<&Document>) -> Option<serde_json::Value>,
    now: i64,
}

impl WriteStatement for diesel::SqliteConnection {
    /// An explicit transaction: in SQLite's autocommit mode `INSERT … RETURNING` commits when
    /// the statement is reset, after the row was read back, and a commit that fails there (a
    /// full disk) goes unreported, so the caller would confirm a row that is gone. An explicit
    /// COMMIT reports its failure.
    fn write_statement<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T> {
        self.transaction(write)
    }

    /// `BEGIN IMMEDIATE`: the write lock from the start, so that a write after a read cannot
    /// fail because another process wrote in between (a deferred transaction's upgrade would
    /// get `SQLITE_BUSY` at once, without the busy handler).
    fn write_transaction<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T> {
        self.immediate_transaction(work)
    }
}

impl WriteStatement for diesel::PgConnection {
    /// Autocommit: PostgreSQL commits a statement before answering it and reports a failed
    /// commit as the statement's error, so BEGIN and COMMIT would only add two round trips per
    /// write. (The check on the failure path reads a snapshot of its own under READ COMMITTED
    /// inside a transaction too.)
    fn write_statement<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T> {
        write(self)
    }

    fn write_transaction<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> QueryResult<T>,
    ) -> QueryResult<T> {
        self.transaction(work)
    }

    /// Three round trips instead of two per document: the documents are read and locked in
    /// key order (`FOR UPDATE`, so no other writer changes them before the commit), changed
    /// in memory (a repeated id sees its earlier change), and written back by one `UPDATE …
    /// FROM unnest(…)`, still conditioned on the etags read. A document that does not exist
    /// yet (no row to lock) sends the batch down the statement-per-document path.
    fn update_batch_at_once(&mut self, batch: &mut Batch<'_>) -> QueryResult<Option<Vec<Outcome>>> {
        use std::collections::HashMap;

        #[derive(QueryableByName)]
        struct Locked {
            #[diesel(sql_type = sql_types::Text)]
            id_key: String,
            #[diesel(sql_type = sql_types::Text)]
            id: String,
            #[diesel(sql_type = sql_types::Nullable<sql_types::Text>)]
            parent: Option<String>,
            #[diesel(sql_type = sql_types::Text)]
            body: String,
            #[diesel(sql_type = sql_types::Text)]
            etag: String,
            #[diesel(sql_type = sql_types::BigInt)]
            created_at: i64,
            #[diesel(sql_type = sql_types::BigInt)]
            updated_at: i64,
        }

        let table = batch.collection.table_name();
        let mut keys: Vec<&str> = batch.order.iter().map(|(_, key)| key.as_str()).collect();
        keys.dedup();
        let locked: Vec<Locked> = diesel::sql_query(format!(
            "SELECT id_key, id, parent, body, etag, created_at, updated_at FROM {table} \
             WHERE id_key = ANY($1) ORDER BY id_key FOR UPDATE"
        ))
        .bind::<sql_types::Array<sql_types::Text>, _>(&keys)
        .load(self)?;
        if locked.len() != keys.len() {
            return Ok(None);
        }
        // Per key: the document as read (or as the key's last change left it), and the etag
        // the stored row has.
        let mut current: HashMap<String, (Result<Document, StoreError>, String)> = locked
            .into_iter()
            .map(|l| {
                let row = Row {
                    id: l.id,
                    parent: l.parent,
                    body: l.body,
                    etag: l.etag.clone(),
                    created_at: l.created_at,
                    updated_at: l.updated_at,
                };
                (l.id_key, (row.into_document(), l.etag))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(batch.order.len());
        // The final body and etag of each changed key.
        let mut written: HashMap<&str, (String, String)> = HashMap::new();
        for (i, key) in batch.order {
            let Some((read, _)) = current.get_mut(key.as_str()) else {
                return Ok(None);
            };
            let doc = match read {
                Ok(doc) => doc,
                Err(e) => {
                    outcomes.push((*i, Err(e.clone())));
                    continue;
                }
            };
            let Some(body) = (batch.change)(*i, Some(doc)) else {
                outcomes.push((*i, Ok(Some(doc.clone()))));
                continue;
            };
            let text = match serde_json::to_string(&body) {
                Ok(text) => text,
                Err(e) => {
                    let error = StoreError::Backend(format!("cannot serialise body: {e}"));
                    outcomes.push((*i, Err(error)));
                    continue;
                }
            };
            let tag = etag::fresh();
            match written_document(
                Some(doc.clone()),
                batch.ids[*i],
                body,
                tag.clone(),
                batch.now,
            ) {
                Ok(new) => {
                    *doc = new.clone();
                    written.insert(key, (text, tag));
                    outcomes.push((*i, Ok(Some(new))));
                }
                Err(e) => outcomes.push((*i, Err(e))),
            }
        }
        if written.is_empty() {
            return Ok(Some(outcomes));
        }
        let mut columns: [Vec<&str>; 4] = Default::default();
        for (key, (text, tag)) in &written {
            let read_etag = current.get(*key).map_or("", |(_, etag)| etag.as_str());
            columns[0].push(key);
            columns[1].push(read_etag);
            columns[2].push(text);
            columns[3].push(tag);
        }
        let [keys, read_etags, bodies, tags] = columns;
        let updated = diesel::sql_query(format!(
            "UPDATE {table} AS t SET body = v.body, etag = v.etag, updated_at = $1 \
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) \
             AS v(id_key, read_etag, body, etag) \
             WHERE t.id_key = v.id_key AND t.etag = v.read_etag"
        ))
        .bind::<sql_types::BigInt, _>(batch.now)
        .bind::<sql_types::Array<sql_types::Text>, _>(&keys)
        .bind::<sql_types::Array<sql_types::Text>, _>(&read_etags)
        .bind::<sql_types::Array<sql_types::Text>, _>(&bodies)
        .bind::<sql_types::Array<sql_types::Text>, _>(&tags)
        .execute(self)?;
        if updated != keys.len() {
            // The rows are locked: only a bug gets here. Nothing of the batch is kept.
            return Err(diesel::result::Error::QueryBuilderError(
                format!("{updated} of {} locked documents were updated", keys.len()).into(),
            ));
        }
        Ok(Some(outcomes))
    }
}

/// The columns that make a [`Row`].
macro_rules! row_columns {
    ($t:ident) => {
        (
            $t::id,
            $t::parent,
            $t::body,
            $t::etag,
            $t::created_at,
            $t::updated_at,
        )
    };
}

/// All columns of a new row, from a [`NewRow`].
macro_rules! insert_values {
    ($t:ident, $new:expr) => {
        (
            $t::id_key.eq(&$new.id_key),
            $t::id.eq($new.id),
            $t::parent_key.eq($new.parent_key.as_deref()),
            $t::parent.eq($new.parent),
            $t::body.eq(&$new.body),
            $t::etag.eq(&$new.etag),
            $t::created_at.eq($new.now),
            $t::updated_at.eq($new.now),
        )
    };
}

/// The columns an overwrite changes: not the id (its first-written case stays) nor created_at.
macro_rules! update_values {
    ($t:ident, $new:expr) => {
        (
            $t::parent_key.eq($new.parent_key.as_deref()),
            $t::parent.eq($new.parent),
            $t::body.eq(&$new.body),
            $t::etag.eq(&$new.etag),
            $t::updated_at.eq($new.now),
        )
    };
}

/// Whether a row with this id key exists.
macro_rules! exists {
    ($t:ident, $conn:expr, $key:expr) => {
        diesel::select(diesel::dsl::exists($t::table.find($key))).get_result::<bool>($conn)
    };
}

/// A document as stored.
#[derive(Queryable)]
struct Row {
    id: String,
    parent: Option<String>,
    body: String,
    etag: String,
    created_at: i64,
    updated_at: i64,
}

impl Row {
    fn into_document(self) -> Result<Document, StoreError> {
        let body = serde_json::from_str(&self.body).map_err(|e| {
            StoreError::Backend(format!("stored body of `{}` is not JSON: {e}", self.id))
        })?;
        Ok(Document {
            body,
            etag: self.etag,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            id: self.id,
            parent: self.parent,
        })
    }
}

/// The column values of a write.
struct NewRow<'a> {
    id_key: String,
    id: &'a str,
    parent_key: Option<String>,
    parent: Option<&'a str>,
    body: String,
    etag: String,
    now: i64,
}

/// The outcome of a conditional write that may have matched no row.
enum Conditional {
    Done(Row),
    Missing,
    Mismatch,
}

impl Conditional {
    /// Tells apart the two reasons a conditional statement touched no row. Runs in the
    /// statement's transaction.
    fn settle(row: Option<Row>, exists: impl FnOnce() -> QueryResult<bool>) -> QueryResult<Self> {
        Ok(match row {
            Some(row) => Conditional::Done(row),
            None if exists()? => Conditional::Mismatch,
            None => Conditional::Missing,
        })
    }

    fn into_document(self) -> Result<Document, StoreError> {
        match self {
            Conditional::Done(row) => row.into_document(),
            Conditional::Missing => Err(StoreError::NotFound),
            Conditional::Mismatch => Err(StoreError::PreconditionFailed),
        }
    }
}

/// A pool of connections to one SQLite file or PostgreSQL database.
pub struct Database {
    pool: Pool<Manager>,
    backend: Backend,
    /// SQLite takes one writer at a time; a writer that finds the lock taken sleeps in
    /// SQLite's busy handler (1, 2, 5, … 100 ms steps), which under load costs far more than
    /// the write. Queueing document writers here instead lets each start the moment the
    /// previous one commits. `None` on PostgreSQL (row locks, many writers).
    sqlite_writer: Option<std::sync::Mutex<()>>,
    /// Whether writes commit (see `health.rs`).
    health: WriteHealth,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl Database {
    pub(super) fn open(url: &str, options: &Options) -> Result<Database, StoreError> {
        let target = Target::parse(url, options.connection_timeout)?;
        target.prepare()?;
        // Migrate on a connection of its own, outside the pool, so that a connect failure is
        // reported as it is and PostgreSQL's advisory lock ends with the connection.
        let mut conn = target.connect().map_err(connection::unavailable)?;
        connection::migrate(&mut conn)?;
        drop(conn);

        let backend = target.backend();
        let max_size = options.max_connections.unwrap_or(match backend {
            Backend::Sqlite => SQLITE_POOL_SIZE,
            Backend::Postgres => POSTGRES_POOL_SIZE,
        });
        let pool = Pool::builder()
            .max_size(max_size.max(1))
            // One warm connection; the rest are opened on demand and closed when idle.
            .min_idle(Some(u32::from(options.keep_warm)))
            .connection_timeout(options.connection_timeout)
            .build_unchecked(Manager { target });
        let sqlite_writer = (backend == Backend::Sqlite).then(|| std::sync::Mutex::new(()));
        Ok(Database {
            pool,
            backend,
            sqlite_writer,
            health: WriteHealth::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn connection(&self) -> Result<PooledConnection<Manager>, StoreError> {
        self.pool.get().map_err(connection::unavailable)
    }

    /// Held around one document write on SQLite (see `sqlite_writer`).
    fn writer(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.sqlite_writer
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The outcome of a write transaction, recorded for `/healthz`.
    fn written<T>(&self, result: QueryResult<T>) -> Result<T, StoreError> {
        let result = result.map_err(StoreError::from);
        self.health.record(&result);
        result
    }
}

impl DocumentStore for Database {
    fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError> {
        let key = id_key(collection, id);
        let mut conn = self.connection()?;
        let row = with_table!(collection, t => with_backend!(&mut **conn, conn => {
            t::table
                .find(&key)
                .select(row_columns!(t))
                .first::<Row>(conn)
                .optional()
        }))?;
        row.map(Row::into_document).transpose()
    }

    fn put(
        &self,
        collection: Collection,
        id: &str,
        parent: Option<&str>,
        body: &serde_json::Value,
        write: Write,
    ) -> Result<Document, StoreError> {
        let new = NewRow {
            id_key: id_key(collection, id),
            id,
            parent_key: parent.map(|p| id_key(collection, p)),
            parent,
            body: serde_json::to_string(body)
                .map_err(|e| StoreError::Backend(format!("cannot serialise body: {e}")))?,
            etag: etag::fresh(),
            now: now_micros()?,
        };
        let mut conn = self.connection()?;
        let _writer = self.writer();
        // Every write goes through `write_statement`: a transaction on SQLite (see there).
        match write {
            Write::Create => {
                let row = self.written(
                    with_table!(collection, t => with_backend!(&mut **conn, conn => {
                        conn.write_statement(|conn| {
                            diesel::insert_into(t::table)
                                .values(insert_values!(t, new))
                                .returning(row_columns!(t))
                                .get_result::<Row>(conn)
                        })
                    })),
                )?;
                row.into_document()
            }
            Write::Upsert => {
                let row = self.written(
                    with_table!(collection, t => with_backend!(&mut **conn, conn => {
                        conn.write_statement(|conn| {
                            diesel::insert_into(t::table)
                                .values(insert_values!(t, new))
                                .on_conflict(t::id_key)
                                .do_update()
                                .set(update_values!(t, new))
                                .returning(row_columns!(t))
                                .get_result::<Row>(conn)
                        })
                    })),
                )?;
                row.into_document()
            }
            Write::IfMatch(tag) => {
                let expected = (!etag::is_any(&tag)).then(|| etag::stored_form(&tag));
                let outcome = self.written(
                    with_table!(collection, t => with_backend!(&mut **conn, conn => {
                        conn.write_statement(|conn| {
                            let mut update = diesel::update(t::table.find(&new.id_key))
                                .set(update_values!(t, new))
                                .into_boxed();
                            if let Some(expected) = &expected {
                                update = update.filter(t::etag.eq(expected));
                            }
                            let row = update
                                .returning(row_columns!(t))
                                .get_result::<Row>(conn)
                                .optional()?;
                            Conditional::settle(row, || exists!(t, conn, &new.id_key))
                        })
                    })),
                )?;
                outcome.into_document()
            }
        }
    }

    fn delete(
        &self,
        collection: Collection,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<Document, StoreError> {
        let key = id_key(collection, id);
        let expected = if_match
            .filter(|tag| !etag::is_any(tag))
            .map(etag::stored_form);
        let mut conn = self.connection()?;
        let _writer = self.writer();
        let outcome = self.written(
            with_table!(collection, t => with_backend!(&mut **conn, conn => {
                conn.write_statement(|conn| {
                    let mut delete = diesel::delete(t::table.find(&key)).into_boxed();
                    if let Some(expected) = &expected {
                        delete = delete.filter(t::etag.eq(expected));
                    }
                    let row = delete
                        .returning(row_columns!(t))
                        .get_result::<Row>(conn)
                        .optional()?;
                    Conditional::settle(row, || exists!(t, conn, &key))
                })
            })),
        )?;
        outcome.into_document()
    }

    fn update_batch(
        &self,
        collection: Collection,
        ids: &[&str],
        change: &mut dyn FnMut(usize, Option<&Document>) -> Option<serde_json::Value>,
    ) -> Result<Vec<Result<Option<Document>, StoreError>>, StoreError> {
        let now = now_micros()?;
        let update_sql = conditional_update_sql(collection, self.backend);
        // By key, and in arrival order for one key: PostgreSQL row locks are then taken in the
        // same order by every batch, so two processes' batches cannot deadlock.
        let mut order: Vec<(usize, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (i, id_key(collection, id)))
            .collect();
        order.sort_by(|a, b| a.1.cmp(&b.1));
        let mut conn = self.connection()?;
        let _writer = self.writer();
        self.written(with_table!(collection, t => with_backend!(&mut **conn, conn => {
            conn.write_transaction(|conn| {
                let mut batch = Batch { collection, ids, order: &order, change: &mut *change, now };
                if let Some(outcomes) = conn.update_batch_at_once(&mut batch)? {
                    return Ok(outcomes);
                }
                let mut outcomes = Vec::with_capacity(order.len());
                for (i, key) in order {
                    let id = ids[i];
                    let mut outcome = None;
                    // Again only when another process wrote the document between this read
                    // and the write (PostgreSQL; SQLite's write lock is held from the start).
                    for _ in 0..UPDATE_ATTEMPTS {
                        let row = t::table
                            .find(&key)
                            .select(row_columns!(t))
                            .first::<Row>(conn)
                            .optional()?;
                        let current = match row.map(Row::into_document).transpose() {
                            Ok(current) => current,
                            Err(e) => {
                                outcome = Some(Err(e));
                                break;
                            }
                        };
                        let Some(body) = change(i, current.as_ref()) else {
                            outcome = Some(Ok(current));
                            break;
                        };
                        let text = match serde_json::to_string(&body) {
                            Ok(text) => text,
                            Err(e) => {
                                outcome = Some(Err(StoreError::Backend(format!(
                                    "cannot serialise body: {e}"
                                ))));
                                break;
                            }
                        };
                        let tag = etag::fresh();
                        let written = match &current {
                            Some(doc) => diesel::sql_query(&update_sql)
                                .bind::<sql_types::Text, _>(&text)
                                .bind::<sql_types::Text, _>(&tag)
                                .bind::<sql_types::BigInt, _>(now)
                                .bind::<sql_types::Text, _>(&key)
                                .bind::<sql_types::Text, _>(&doc.etag)
                                .execute(conn)?,
                            None => {
                                let new = NewRow {
                                    id_key: key.clone(),
                                    id,
                                    parent_key: None,
                                    parent: None,
                                    body: text,
                                    etag: tag.clone(),
                                    now,
                                };
                                diesel::insert_into(t::table)
                                    .values(insert_values!(t, new))
                                    .on_conflict(t::id_key)
                                    .do_nothing()
                                    .execute(conn)?
                            }
                        };
                        if written == 0 {
                            continue;
                        }
                        outcome = Some(written_document(current, id, body, tag, now).map(Some));
                        break;
                    }
                    let outcome = outcome.unwrap_or_else(|| {
                        Err(StoreError::Unavailable(format!(
                            "{} `{id}` kept changing under {UPDATE_ATTEMPTS} read-modify-writes",
                            collection.table_name()
                        )))
                    });
                    outcomes.push((i, outcome));
                }
                Ok(outcomes)
            })
        })))
        .map(|mut outcomes| {
            outcomes.sort_unstable_by_key(|(i, _)| *i);
            outcomes.into_iter().map(|(_, outcome)| outcome).collect()
        })
    }

    fn list(
        &self,
        collection: Collection,
        parent: Option<&str>,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<Page, StoreError> {
        let after = continuation.map(continuation::decode).transpose()?;
        let parent_key = parent.map(|p| id_key(collection, p));
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        // One extra row tells whether there is a next page.
        let limit = i64::try_from(page_size + 1).unwrap_or(i64::MAX);
        let mut conn = self.connection()?;
        let mut rows = with_table!(collection, t => with_backend!(&mut **conn, conn => {
            let mut query = t::table
                .select((t::id_key, row_columns!(t)))
                .order(t::id_key.asc())
                .limit(limit)
                .into_boxed();
            if let Some(parent_key) = &parent_key {
                query = query.filter(t::parent_key.eq(parent_key));
            }
            if let Some(after) = &after {
                query = query.filter(t::id_key.gt(after));
            }
            query.load::<(String, Row)>(conn)
        }))?;

        let continuation = if rows.len() > page_size {
            rows.truncate(page_size);
            rows.last().map(|(key, _)| continuation::encode(key))
        } else {
            None
        };
        let items = rows
            .into_iter()
            .map(|(_, row)| row.into_document())
            .collect::<Result<_, _>>()?;
        Ok(Page {
            items,
            continuation,
        })
    }

    fn setting_init(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let mut conn = self.connection()?;
        let _writer = self.writer();
        self.written(with_backend!(&mut **conn, conn => {
            // Insert-if-absent then read: a concurrent initialiser either wins the insert or
            // waits for it (PostgreSQL) / is serialised (SQLite), so both read the same value.
            conn.transaction(|conn| {
                diesel::insert_into(settings::table)
                    .values((settings::key.eq(key), settings::value.eq(value)))
                    .on_conflict(settings::key)
                    .do_nothing()
                    .execute(conn)?;
                settings::table
                    .find(key)
                    .select(settings::value)
                    .first::<String>(conn)
            })
        }))
    }

    fn setting_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.connection()?;
        let stored = with_backend!(&mut **conn, conn => {
            settings::table
                .find(key)
                .select(settings::value)
                .first::<String>(conn)
                .optional()
        })?;
        Ok(stored)
    }

    fn setting_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let _writer = self.writer();
        self.written(with_backend!(&mut **conn, conn => {
            conn.transaction(|conn| {
                diesel::insert_into(settings::table)
                    .values((settings::key.eq(key), settings::value.eq(value)))
                    .on_conflict(settings::key)
                    .do_update()
                    .set(settings::value.eq(value))
                    .execute(conn)
            })
        }))?;
        Ok(())
    }

    fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        conn.ping()?;
        Ok(())
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        self.writable_known()
            .unwrap_or_else(|| self.setting_set("health_probe", &crate::time::now_rfc3339()))
    }

    fn writable_known(&self) -> Option<Result<(), StoreError>> {
        match self.health.check() {
            Check::Writable => Some(Ok(())),
            Check::Failing(fault) => Some(Err(fault)),
            Check::Probe => None,
        }
    }
}

/// `UPDATE … SET body, etag, updated_at WHERE id_key AND etag` for the collection's table, in
/// the backend's bind syntax. Written out because diesel prepares its own UPDATE statements
/// afresh on every call (a changeset may vary), while SQL text it is given is prepared once per
/// connection and kept: in a batch of a hundred writes the difference is a hundred parses.
fn conditional_update_sql(collection: Collection, backend: Backend) -> String {
    let table = collection.table_name();
    match backend {
        Backend::Sqlite => format!(
            "UPDATE {table} SET body = ?, etag = ?, updated_at = ? WHERE id_key = ? AND etag = ?"
        ),
        Backend::Postgres => format!(
            "UPDATE {table} SET body = $1, etag = $2, updated_at = $3 WHERE id_key = $4 AND etag = $5"
        ),
    }
}

/// The document a batch write stored: `current` (if there was one) with a new body and etag.
fn written_document(
    current: Option<Document>,
    id: &str,
    body: serde_json::Value,
    etag: String,
    now: i64,
) -> Result<Document, StoreError> {
    let updated_at = from_micros(now)?;
    Ok(match current {
        Some(doc) => Document {
            body,
            etag,
            updated_at,
            ..doc
        },
        None => Document {
            id: id.to_owned(),
            parent: None,
            body,
            etag,
            created_at: updated_at,
            updated_at,
        },
    })
}

/// The primary key of an id in a collection: lower-cased where ids are case-insensitive.
pub(super) fn id_key(collection: Collection, id: &str) -> String {
    if collection.case_sensitive() {
        id.to_owned()
    } else {
        id.to_lowercase()
    }
}

fn now_micros() -> Result<i64, StoreError> {
    let micros = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
    i64::try_from(micros).map_err(|_| StoreError::Backend("clock out of range".to_owned()))
}

fn from_micros(micros: i64) -> Result<time::OffsetDateTime, StoreError> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|e| StoreError::Backend(format!("stored timestamp {micros} out of range: {e}")))
}
