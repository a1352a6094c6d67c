DROP TABLE hub_policies;
DROP TABLE c2d_messages;
DROP TABLE mqtt_sessions;
DROP TABLE twins;
DROP TABLE devices;
