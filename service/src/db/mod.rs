//! Storage: JSON documents with etags, and instance settings, in SQLite or PostgreSQL.
//!
//! The domain sees only [`DocumentStore`]; diesel, the schema and the migrations stay in this
//! module. [`open`] picks the backend from the URL scheme (`sqlite://PATH`, `postgres://…`),
//! applies the embedded migrations of that backend (`migrations/{sqlite,postgres}`) and returns
//! a pooled [`Database`].
//!
//! - Each [`Collection`] is its own table of the same shape (see `schema.rs`). Ids are
//!   case-insensitive, as in Azure DPS: rows are keyed by the lower-cased id, and the id keeps
//!   the case it was first written with.
//! - Every write stores a fresh etag. Optimistic concurrency is enforced by the database: a
//!   conditional write is `UPDATE … WHERE id_key = ? AND etag = ?`, never a read-then-write.
//! - The API is synchronous; async callers run calls through [`blocking`]. A read-modify-write
//!   of one document is [`DocumentStore::update`] (on `dyn DocumentStore`), which retries when a
//!   concurrent writer got there first.
//!
//! **Invariant:** [`StoreError::Backend`] and [`StoreError::Unavailable`] carry database detail
//! for the logs only; nothing in them may reach a device or an API caller.

mod connection;
mod continuation;
mod etag;
mod health;
mod process;
mod schema;
mod store;
pub mod telemetry;
mod update;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use connection::Backend;
pub use process::{HubLock, HubLockError, has_setting};
pub use store::Database;
pub use update::{Change, Read, UPDATE_ATTEMPTS, Updated, blocking};

/// A kind of stored document. Each collection is a table of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    IndividualEnrollments,
    EnrollmentGroups,
    /// Device registration states; `parent` is the enrollment group id, if any.
    Registrations,
    CaCertificates,
    AuthorizationPolicies,
    /// Hub device identities; ids are case-sensitive, as in IoT Hub.
    Devices,
    /// Device twins, keyed like their devices.
    Twins,
    /// Persistent MQTT sessions (CleanSession=0): subscriptions by client key.
    MqttSessions,
    /// Pending cloud-to-device messages; `parent` is the device id, ids sort in enqueue order.
    C2dMessages,
    /// Hub shared access policies (iothubowner, service, device, …).
    HubPolicies,
    /// Hubs linked to this provisioning service, keyed by host name (see `dps::hubs`).
    LinkedHubs,
    /// Ids (`jti`) of hub join tokens already used; a join token is single-use.
    JoinTokens,
    /// Certificates this service issued, keyed by serial (hex); `parent` is the registration id.
    IssuedCertificates,
    /// PKI audit trail (issue, renew, revoke); ids sort by time; `parent` is the registration id.
    AuditEvents,
    /// PKI state shared by replicas: the current signed CRL and its number (see `pki`).
    PkiState,
    /// Moved devices' identities still to be removed from their old hub, keyed
    /// `{hub lower-cased}/{device id}`; `parent` is the hub's lower-cased name (see `dps`).
    StaleIdentities,
    /// Feedback records of ended C2D messages sent with an `ack`, waiting to be read on the
    /// AMQP feedback link; keyed like the message; `parent` is the device id.
    C2dFeedback,
}

impl Collection {
    pub const ALL: [Collection; 17] = [
        Collection::IndividualEnrollments,
        Collection::EnrollmentGroups,
        Collection::Registrations,
        Collection::CaCertificates,
        Collection::AuthorizationPolicies,
        Collection::Devices,
        Collection::Twins,
        Collection::MqttSessions,
        Collection::C2dMessages,
        Collection::HubPolicies,
        Collection::LinkedHubs,
        Collection::JoinTokens,
        Collection::IssuedCertificates,
        Collection::AuditEvents,
        Collection::PkiState,
        Collection::StaleIdentities,
        Collection::C2dFeedback,
    ];

    /// The table that holds this collection (for logs).
    pub fn table_name(self) -> &'static str {
        match self {
            Collection::IndividualEnrollments => "individual_enrollments",
            Collection::EnrollmentGroups => "enrollment_groups",
            Collection::Registrations => "registrations",
            Collection::CaCertificates => "ca_certificates",
            Collection::AuthorizationPolicies => "authorization_policies",
            Collection::Devices => "devices",
            Collection::Twins => "twins",
            Collection::MqttSessions => "mqtt_sessions",
            Collection::C2dMessages => "c2d_messages",
            Collection::HubPolicies => "hub_policies",
            Collection::LinkedHubs => "linked_hubs",
            Collection::JoinTokens => "join_tokens",
            Collection::IssuedCertificates => "issued_certificates",
            Collection::AuditEvents => "audit_events",
            Collection::PkiState => "pki_state",
            Collection::StaleIdentities => "stale_identities",
            Collection::C2dFeedback => "c2d_feedback",
        }
    }

    /// Whether ids compare case-sensitively. DPS ids are case-insensitive; IoT Hub device ids
    /// (and everything keyed by them) are case-sensitive.
    pub fn case_sensitive(self) -> bool {
        matches!(
            self,
            Collection::Devices
                | Collection::Twins
                | Collection::MqttSessions
                | Collection::C2dMessages
                | Collection::StaleIdentities
                | Collection::C2dFeedback
        )
    }
}

/// A stored document as read back from the database.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The id in the case it was first written with.
    pub id: String,
    /// The owning document's id (e.g. the enrollment group of a registration), in the case of
    /// the latest write.
    pub parent: Option<String>,
    pub body: serde_json::Value,
    /// Quoted, as in an HTTP `ETag` header: `"\"…\""`.
    pub etag: String,
    /// Microsecond precision.
    pub created_at: time::OffsetDateTime,
    /// Microsecond precision.
    pub updated_at: time::OffsetDateTime,
}

/// How [`DocumentStore::put`] treats an existing document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert; [`StoreError::Conflict`] if the id exists (in any case).
    Create,
    /// Insert, or overwrite unconditionally. An overwrite keeps `id` and `created_at`.
    Upsert,
    /// Overwrite only if the stored etag equals this one (`abc`, `"abc"` and `W/"abc"` are the
    /// same tag; `*` matches any). [`StoreError::NotFound`] if the id does not exist,
    /// [`StoreError::PreconditionFailed`] if the etag differs.
    IfMatch(String),
}

/// One page of [`DocumentStore::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub items: Vec<Document>,
    /// Pass back to get the next page; `None` on the last page.
    pub continuation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Conflict,
    #[error("etag mismatch")]
    PreconditionFailed,
    #[error("invalid continuation token")]
    BadContinuation,
    /// The database URL cannot be used; the text never contains the URL itself (it may hold a
    /// password).
    #[error("invalid database url: {0}")]
    InvalidUrl(String),
    /// Full detail for the logs; the HTTP layer never shows it.
    #[error("database error: {0}")]
    Backend(String),
    /// The database cannot be reached or is busy; worth retrying later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The disk (or the database's quota) is full: nothing was written. Worth retrying once
    /// space is freed. The text is for the logs.
    #[error("storage full: {0}")]
    Full(String),
}

impl StoreError {
    /// Whether the error says the storage itself fails (rather than something about the
    /// document, such as a conflict): these make the store degraded in `/healthz`.
    pub fn is_storage_fault(&self) -> bool {
        matches!(
            self,
            StoreError::Backend(_) | StoreError::Unavailable(_) | StoreError::Full(_)
        )
    }
}

/// Documents and settings. Synchronous: async callers use [`blocking`].
pub trait DocumentStore: Send + Sync + 'static {
    /// The document with this id (case-insensitive), if any.
    fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError>;

    /// Writes `body` under `id` with a fresh etag and returns what was stored.
    fn put(
        &self,
        collection: Collection,
        id: &str,
        parent: Option<&str>,
        body: &serde_json::Value,
        write: Write,
    ) -> Result<Document, StoreError>;

    /// Deletes the document and returns it. With `if_match`, only if the stored etag equals it
    /// (`*` matches any): [`StoreError::PreconditionFailed`] otherwise.
    fn delete(
        &self,
        collection: Collection,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<Document, StoreError>;

    /// Read-modify-writes of several documents of one collection in one transaction, with one
    /// commit: for each of `ids` (taken by key, and in the given order for one key) it reads
    /// the document (seeing the batch's earlier writes, so an id may repeat), asks
    /// `change(index, current)` for its new body (`None`: leave it) and writes that under the
    /// etag it read. `change` may be asked again for the
    /// same index when another process wrote the document in between, so it must be a function
    /// of the document it is given. Returns one outcome per id: the document as stored now, or
    /// that document's own error (a stored body that is not JSON). `Err` when the transaction
    /// failed: then nothing of it is stored. Callers use
    /// [`update_each`](DocumentStore::update_each), which takes this process's turns.
    fn update_batch(
        &self,
        collection: Collection,
        ids: &[&str],
        change: &mut dyn FnMut(usize, Option<&Document>) -> Option<serde_json::Value>,
    ) -> Result<Vec<Result<Option<Document>, StoreError>>, StoreError>;

    /// A page of documents in a stable order (by lower-cased id), optionally only those whose
    /// parent is `parent` (case-insensitive). `page_size` is clamped to `1..=1000`.
    /// A `continuation` not produced by this method gives [`StoreError::BadContinuation`].
    fn list(
        &self,
        collection: Collection,
        parent: Option<&str>,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<Page, StoreError>;

    /// Instance settings (id scope, JWT secret…): stores `value` if `key` is absent and returns
    /// what is stored. Atomic: two replicas starting at once get the same answer.
    fn setting_init(&self, key: &str, value: &str) -> Result<String, StoreError>;

    fn setting_get(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Stores `value` under `key`, replacing any previous value.
    fn setting_set(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Checks that the database answers (for readiness probes).
    fn ping(&self) -> Result<(), StoreError>;

    /// Checks that the database takes writes: the latest storage fault while writes keep
    /// failing (see `health.rs`), otherwise `Ok`. When no write committed lately it writes a
    /// probe (the setting `health_probe`), so a store recovers by itself once the fault is
    /// gone.
    fn check_writable(&self) -> Result<(), StoreError>;

    /// What [`check_writable`](Self::check_writable) would answer, when it can tell without
    /// touching the database (a write committed lately, or a fault still fresh); `None` when
    /// only a probe write can tell. Cheap enough for async code.
    fn writable_known(&self) -> Option<Result<(), StoreError>> {
        None
    }

    /// Every document of a collection (optionally of one parent), in list order: all pages.
    /// For collections an instance keeps small (policies, CA certificates, groups).
    fn list_all(
        &self,
        collection: Collection,
        parent: Option<&str>,
    ) -> Result<Vec<Document>, StoreError> {
        let mut out = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let page = self.list(collection, parent, 1000, continuation.as_deref())?;
            out.extend(page.items);
            match page.continuation {
                Some(next) => continuation = Some(next),
                None => return Ok(out),
            }
        }
    }
}

/// Pool settings for [`open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Pool size; `None` picks 4 for SQLite (one writer at a time anyway) and 8 for PostgreSQL.
    pub max_connections: Option<u32>,
    /// How long a call waits for a pooled connection, and the PostgreSQL connect timeout,
    /// before failing with [`StoreError::Unavailable`].
    pub connection_timeout: Duration,
    /// Keep one connection open in the background (a server). Short-lived CLI processes turn
    /// it off: a background connect still running when the process exits races the TLS
    /// library's exit-time cleanup inside libpq, which can crash the process (seen as
    /// SIGSEGV in `zerotouch credentials` on PostgreSQL, about 1 run in 30).
    pub keep_warm: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_connections: None,
            connection_timeout: Duration::from_secs(10),
            keep_warm: true,
        }
    }
}

/// Opens `sqlite://PATH` (relative or absolute; the parent directory is created) or
/// `postgres://…` / `postgresql://…`, and applies pending migrations.
pub fn open(url: &str) -> Result<Database, StoreError> {
    open_with(url, &Options::default())
}

/// [`open`] with explicit pool settings.
pub fn open_with(url: &str, options: &Options) -> Result<Database, StoreError> {
    Database::open(url, options)
}

impl From<diesel::result::Error> for StoreError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match error {
            Error::NotFound => StoreError::NotFound,
            Error::DatabaseError(Kind::UniqueViolation, _) => StoreError::Conflict,
            Error::DatabaseError(Kind::ClosedConnection | Kind::UnableToSendCommand, info) => {
                StoreError::Unavailable(info.message().to_owned())
            }
            // SQLite reports an exhausted busy_timeout only through its message.
            Error::DatabaseError(_, info) if is_sqlite_busy(info.message()) => {
                StoreError::Unavailable(info.message().to_owned())
            }
            Error::DatabaseError(_, info) if is_out_of_space(info.message()) => {
                StoreError::Full(info.message().to_owned())
            }
            // SQLITE_IOERR, SQLITE_READONLY: the file cannot be written right now.
            Error::DatabaseError(_, info) if is_sqlite_io(info.message()) => {
                StoreError::Unavailable(info.message().to_owned())
            }
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED messages (sqlite3_errstr).
fn is_sqlite_busy(message: &str) -> bool {
    message.starts_with("database is locked") || message.starts_with("database table is locked")
}

/// SQLITE_FULL ("database or disk is full"), and PostgreSQL's ENOSPC errors ("could not extend
/// file …: No space left on device", SQLSTATE 53100, which diesel does not expose).
fn is_out_of_space(message: &str) -> bool {
    message.starts_with("database or disk is full") || message.contains("No space left on device")
}

/// SQLITE_IOERR and SQLITE_READONLY messages.
fn is_sqlite_io(message: &str) -> bool {
    message.starts_with("disk I/O error") || message.starts_with("attempt to write a readonly")
}
