//! Diesel table definitions, kept by hand in step with `migrations/{sqlite,postgres}`.
//!
//! The five document tables have the same shape; `store.rs` dispatches on
//! [`Collection`](super::Collection) to pick one. Timestamps are unix microseconds.

diesel::table! {
    individual_enrollments (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    enrollment_groups (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    registrations (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    ca_certificates (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    authorization_policies (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    settings (key) {
        key -> Text,
        value -> Text,
    }
}

diesel::table! {
    devices (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    twins (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    mqtt_sessions (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    c2d_messages (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    hub_policies (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    linked_hubs (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    join_tokens (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    issued_certificates (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    audit_events (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    pki_state (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    stale_identities (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    c2d_feedback (id_key) {
        id_key -> Text,
        id -> Text,
        parent_key -> Nullable<Text>,
        parent -> Nullable<Text>,
        body -> Text,
        etag -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}
