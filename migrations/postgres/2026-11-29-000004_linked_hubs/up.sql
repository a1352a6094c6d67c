-- Hubs linked to this provisioning service (they join with a token and send heartbeats), and
-- the ids of join tokens already used (a join token is single-use). Same document shape as the
-- other collections; hub names are host names, compared case-insensitively.

CREATE TABLE linked_hubs (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX linked_hubs_parent_key ON linked_hubs (parent_key, id_key);

CREATE TABLE join_tokens (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX join_tokens_parent_key ON join_tokens (parent_key, id_key);
