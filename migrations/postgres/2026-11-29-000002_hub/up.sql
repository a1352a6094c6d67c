-- The hub's collections: same document shape as the DPS ones. Device ids are
-- case-sensitive, so for these tables id_key is the id as written.

CREATE TABLE devices (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX devices_parent_key ON devices (parent_key, id_key);

CREATE TABLE twins (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX twins_parent_key ON twins (parent_key, id_key);

CREATE TABLE mqtt_sessions (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX mqtt_sessions_parent_key ON mqtt_sessions (parent_key, id_key);

CREATE TABLE c2d_messages (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX c2d_messages_parent_key ON c2d_messages (parent_key, id_key);

CREATE TABLE hub_policies (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX hub_policies_parent_key ON hub_policies (parent_key, id_key);
