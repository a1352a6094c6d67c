-- Feedback records of cloud-to-device messages sent with an `ack` (IoT Hub feedback: success,
-- expired, rejected, delivery count exceeded), waiting for the service to read them on the AMQP
-- feedback link. Keyed by the message's queue key (enqueue time), so a record is written once and
-- records sort in enqueue order. parent = the device id.
-- Same document shape as the other collections.

CREATE TABLE c2d_feedback (
    id_key TEXT PRIMARY KEY NOT NULL,
    id TEXT NOT NULL,
    parent_key TEXT,
    parent TEXT,
    body TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX c2d_feedback_parent_key ON c2d_feedback (parent_key, id_key);
