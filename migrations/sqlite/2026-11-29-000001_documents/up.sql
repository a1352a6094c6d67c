-- Document collections: one table per collection, all the same shape.
-- id_key / parent_key are the lower-cased ids (ids are case-insensitive, as in Azure DPS);
-- id / parent keep the case they were first written with. body is JSON text. Timestamps are
-- unix microseconds. The etag changes on every write and is compared in SQL.

CREATE TABLE individual_enrollments (
    id_key TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT,
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX individual_enrollments_parent_key ON individual_enrollments (parent_key, id_key);

CREATE TABLE enrollment_groups (
    id_key TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT,
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX enrollment_groups_parent_key ON enrollment_groups (parent_key, id_key);

CREATE TABLE registrations (
    id_key TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT,
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX registrations_parent_key ON registrations (parent_key, id_key);

CREATE TABLE ca_certificates (
    id_key TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT,
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX ca_certificates_parent_key ON ca_certificates (parent_key, id_key);

CREATE TABLE authorization_policies (
    id_key TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT,
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX authorization_policies_parent_key ON authorization_policies (parent_key, id_key);

CREATE TABLE settings (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
