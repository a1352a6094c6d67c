-- Durable device-to-cloud telemetry, appended in batches by one writer (service/src/telemetry.rs).
-- msg_offset is the message's offset: assigned by the database, increasing, never reused. It is
-- not called "offset" because OFFSET is an SQL keyword. The writer takes a batch's offsets from
-- this column's identity sequence (nextval) and inserts them with OVERRIDING SYSTEM VALUE, so
-- that one statement inserts the whole batch and each caller still learns its own offset.
-- Offsets become visible in order only because one writer commits one batch at a time; several
-- replicas appending to the same database would need a different scheme. enqueued_at is unix microseconds. system is a JSON
-- object of system properties, properties a JSON array of [name, value-or-null] in arrival
-- order (TEXT, not jsonb: jsonb would reorder keys and nobody queries inside them).
-- size = body + property names and values, in bytes, for size-based retention.

CREATE TABLE telemetry (
    msg_offset BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    module_id TEXT,
    enqueued_at BIGINT NOT NULL,
    size BIGINT NOT NULL,
    system TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BYTEA NOT NULL
);
CREATE INDEX telemetry_device ON telemetry (device_id, msg_offset);
-- Age-based retention; also covers SUM(size) (index-only scan) for size-based retention.
CREATE INDEX telemetry_enqueued_at ON telemetry (enqueued_at, size);
