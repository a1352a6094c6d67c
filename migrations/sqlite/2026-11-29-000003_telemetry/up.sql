-- Durable device-to-cloud telemetry, appended in batches by one writer (service/src/telemetry.rs).
-- msg_offset is the message's offset: assigned by the database, increasing, never reused
-- (AUTOINCREMENT keeps counting after the newest rows are deleted). It is not called "offset"
-- because OFFSET is an SQL keyword. enqueued_at is unix microseconds. system is a JSON object
-- of system properties, properties a JSON array of [name, value-or-null] in arrival order.
-- size = body + property names and values, in bytes, for size-based retention. size comes
-- before body so that reading it never touches a large body's overflow pages.

CREATE TABLE telemetry (
    msg_offset INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    device_id TEXT NOT NULL,
    module_id TEXT,
    enqueued_at BIGINT NOT NULL,
    size BIGINT NOT NULL,
    system TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX telemetry_device ON telemetry (device_id, msg_offset);
-- Age-based retention; also covers SUM(size) so that size-based retention does not read bodies.
CREATE INDEX telemetry_enqueued_at ON telemetry (enqueued_at, size);
