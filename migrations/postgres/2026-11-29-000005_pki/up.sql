-- The PKI's records: every certificate this service issued (keyed by serial, upper-case hex;
-- parent = the registration id), the audit trail of issue / renew / revoke (keyed by a
-- time-sortable id; parent = the registration id), and PKI state such as the current CRL
-- (one document, updated with etags so replicas agree on a rising CRL number).
-- Same document shape as the other collections.

CREATE TABLE issued_certificates (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX issued_certificates_parent_key ON issued_certificates (parent_key, id_key);

CREATE TABLE audit_events (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX audit_events_parent_key ON audit_events (parent_key, id_key);

CREATE TABLE pki_state (
    id_key TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT COLLATE "C",
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX pki_state_parent_key ON pki_state (parent_key, id_key);
