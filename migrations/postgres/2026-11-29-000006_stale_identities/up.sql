-- Identities of moved devices still to be removed from their old hub (the removal failed when
-- the device moved; the provisioning service retries until it succeeds). Keyed by the old hub's
-- lower-cased name and the device id ("hub/device"); parent = the hub's lower-cased name.
-- Same document shape as the other collections.

CREATE TABLE stale_identities (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX stale_identities_parent_key ON stale_identities (parent_key, id_key);
